"""Encoders of latent extraction: texture VAE architecture and LDM/diffusers weight loading, DINOv2 in timm and
torch-hub layouts, Semantic VAE, composite encoder. Tiny random-init models only (no downloads)."""
from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from sfd_scale.data.encoders import (CompositeEncoder, DinoEncoder, SemanticEncoder, TextureVAE, WeightsError,
                                     image_generators)
from sfd_scale.semvae.model import save_semvae

RES = 64  # 64x64 images -> 4x4 latents / tokens


def images(n=3, seed=0):
    return torch.rand(n, 3, RES, RES, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------- texture VAE
def test_texture_vae_is_ldm_f16d32():
    with torch.device("meta"):
        vae = TextureVAE.build().vae
    # attention after every resnet of the lowest-resolution level (LDM attn_resolutions=[16] at 256), + mid block
    assert type(vae.encoder.down_blocks[-1]).__name__ == "AttnDownEncoderBlock2D"
    assert type(vae.decoder.up_blocks[0]).__name__ == "AttnUpDecoderBlock2D"
    assert len(vae.encoder.down_blocks[-1].attentions) == 2 and len(vae.decoder.up_blocks[0].attentions) == 3
    assert all(type(b).__name__ == "DownEncoderBlock2D" for b in vae.encoder.down_blocks[:-1])
    # parameter count of LDM's Encoder/Decoder + quant convs for ch 128, ch_mult (1,1,2,2,4), 2 res blocks,
    # attn_resolutions [16], z_channels = embed_dim = 32 (counted on the LDM module structure)
    assert sum(p.numel() for p in vae.parameters()) == 69_836_067


def test_texture_encode_modes_and_generators():
    tex = TextureVAE.random_init(0)
    x = images(3) * 2 - 1
    mean = tex.encode(x, mode="mean")
    assert mean.shape == (3, 32, 4, 4)
    a = tex.encode(x, torch.Generator().manual_seed(1))
    b = tex.encode(x, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, mean)
    # per-image generators: the sample of an image does not depend on its batch
    full = tex.encode(x, image_generators(0, [5, 6, 7], False))
    one = tex.encode(x[1:2], image_generators(0, [6], False))
    torch.testing.assert_close(one, full[1:2], rtol=0, atol=1e-6)
    assert not torch.equal(full, tex.encode(x, image_generators(0, [5, 6, 7], True)))


def to_ldm(sd: dict, levels: int) -> dict:
    """diffusers AutoencoderKL keys -> original LDM keys (written independently of the loader's converter)."""
    rules = [
        (r"^encoder\.down_blocks\.(\d+)\.resnets\.", lambda m: f"encoder.down.{m[1]}.block."),
        (r"^encoder\.down_blocks\.(\d+)\.attentions\.", lambda m: f"encoder.down.{m[1]}.attn."),
        (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", lambda m: f"encoder.down.{m[1]}.downsample."),
        (r"^decoder\.up_blocks\.(\d+)\.resnets\.", lambda m: f"decoder.up.{levels - 1 - int(m[1])}.block."),
        (r"^decoder\.up_blocks\.(\d+)\.attentions\.", lambda m: f"decoder.up.{levels - 1 - int(m[1])}.attn."),
        (r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"decoder.up.{levels - 1 - int(m[1])}.upsample."),
        (r"^(\w+)\.mid_block\.resnets\.(\d)\.", lambda m: f"{m[1]}.mid.block_{int(m[2]) + 1}."),
        (r"^(\w+)\.mid_block\.attentions\.0\.", lambda m: f"{m[1]}.mid.attn_1."),
        (r"^(\w+)\.conv_norm_out\.", lambda m: f"{m[1]}.norm_out."),
    ]
    out = {}
    for key, value in sd.items():
        new = key
        for pattern, repl in rules:
            new = re.sub(pattern, repl, new)
        new = new.replace("conv_shortcut", "nin_shortcut")
        if ".attn" in new:
            new = (new.replace("group_norm", "norm").replace("to_q", "q").replace("to_k", "k").replace("to_v", "v")
                   .replace("to_out.0", "proj_out"))
            if value.ndim == 2:  # LDM attention projections are 1x1 convolutions
                value = value[:, :, None, None]
        out[new] = value.clone()
    return out


@pytest.fixture(scope="module")
def tiny_vae():
    return TextureVAE.random_init(3, mode="mean")


def tiny_kwargs():
    from sfd_scale.data.encoders import TINY_TEXTURE
    return dict(TINY_TEXTURE, sample_size=RES)


def test_ldm_checkpoint_loads(tmp_path, tiny_vae):
    ldm = to_ldm(tiny_vae.vae.state_dict(), 5)
    assert "encoder.down.4.attn.1.q.weight" not in ldm and "encoder.down.4.attn.0.q.weight" in ldm
    assert "decoder.up.4.attn.1.proj_out.weight" in ldm  # decoder level 4 = diffusers up block 0
    full = {f"first_stage_model.{k}": v for k, v in ldm.items()}
    full["first_stage_model.loss.logvar"] = torch.zeros(())  # training-only keys are ignored
    torch.save({"state_dict": full, "epoch": 1}, tmp_path / "vae.ckpt")
    save_file(ldm, str(tmp_path / "vae.safetensors"))
    tiny_vae.vae.save_pretrained(tmp_path / "diffusers_dir")
    x = images(2) * 2 - 1
    ref = tiny_vae.encode(x)
    for path, kw in ((tmp_path / "vae.ckpt", tiny_kwargs()), (tmp_path / "vae.safetensors", tiny_kwargs()),
                     (tmp_path / "diffusers_dir", {})):
        loaded = TextureVAE.from_pretrained(path, mode="mean", **kw)
        sd = loaded.vae.state_dict()
        assert all(torch.equal(sd[k], v) for k, v in tiny_vae.vae.state_dict().items()), path
        assert torch.equal(loaded.encode(x), ref), path


def test_ldm_checkpoint_errors(tmp_path, tiny_vae):
    ldm = to_ldm(tiny_vae.vae.state_dict(), 5)
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        TextureVAE.from_pretrained(tmp_path / "nope.ckpt", **tiny_kwargs())
    bad = dict(ldm)
    del bad["encoder.down.4.attn.0.k.weight"]
    torch.save(bad, tmp_path / "missing.pt")
    with pytest.raises(WeightsError, match=r"missing.pt.*missing 1: encoder\.down_blocks\.4\.attentions\.0\.to_k"
                                           r"\.weight \(checkpoint: encoder\.down\.4\.attn\.0\.k\.weight\)"):
        TextureVAE.from_pretrained(tmp_path / "missing.pt", **tiny_kwargs())
    bad = dict(ldm)
    bad["decoder.up.0.block.1.conv2.weight"] = torch.zeros(3, 3, 3, 3)
    bad["encoder.down.9.block.0.conv1.weight"] = torch.zeros(1)
    torch.save({"state_dict": bad}, tmp_path / "shape.pt")
    with pytest.raises(WeightsError) as err:
        TextureVAE.from_pretrained(tmp_path / "shape.pt", **tiny_kwargs())
    assert "decoder.up.0.block.1.conv2.weight" in str(err.value) and "(3, 3, 3, 3)" in str(err.value)
    assert "unexpected 1: encoder.down.9.block.0.conv1.weight" in str(err.value)


# ------------------------------------------------------------------------------------------- DINOv2
DINO_TINY = dict(embed_dim=32, depth=2, num_heads=2, img_size=56)


def to_hub(sd: dict) -> dict:
    """timm vit_*_reg4_dinov2 keys -> facebookresearch/dinov2 torch-hub layout (cls token carries pos 0)."""
    out = {k: v.clone() for k, v in sd.items() if k not in ("cls_token", "reg_token", "pos_embed")}
    pos0 = torch.randn(1, 1, sd["pos_embed"].shape[-1])
    out["pos_embed"] = torch.cat([pos0, sd["pos_embed"]], 1)
    out["cls_token"] = sd["cls_token"] - pos0
    out["register_tokens"] = sd["reg_token"].clone()
    out["mask_token"] = torch.zeros(1, sd["pos_embed"].shape[-1])
    return out


def test_dino_features_and_layouts(tmp_path):
    dino = DinoEncoder.random_init(0, **DINO_TINY)
    x = images(2)
    feats = dino(x)
    assert feats.shape == (2, 32, 4, 4)
    # final-layer normalised patch tokens of the resized (56x56), ImageNet-normalised full image
    y = F.interpolate(x, size=(56, 56), mode="bicubic", antialias=True)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    y = (y - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    tokens = dino.model.forward_features(y)[:, 5:]
    assert torch.equal(feats, tokens.transpose(1, 2).reshape(2, 32, 4, 4))
    torch.save(to_hub(dino.model.state_dict()), tmp_path / "hub.pth")
    save_file(dino.model.state_dict(), str(tmp_path / "timm.safetensors"))
    for name in ("hub.pth", "timm.safetensors"):
        torch.testing.assert_close(DinoEncoder.from_pretrained(tmp_path / name, **DINO_TINY)(x), feats,
                                   rtol=0, atol=1e-5)
    bad = to_hub(dino.model.state_dict())
    del bad["blocks.1.attn.qkv.weight"]
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(WeightsError, match=r"bad.pth.*missing 1: blocks\.1\.attn\.qkv\.weight"):
        DinoEncoder.from_pretrained(tmp_path / "bad.pth", **DINO_TINY)
    with pytest.raises(FileNotFoundError, match="absent.pth"):
        DinoEncoder.from_pretrained(tmp_path / "absent.pth", **DINO_TINY)


# ------------------------------------------------------------------------------------------- semantic + composite
def test_composite_encoder(tmp_path):
    enc = CompositeEncoder.random_init(0, dino=DINO_TINY)
    x = images(2)
    u8 = (x * 255).round().to(torch.uint8)
    out = enc.encode(u8.permute(0, 2, 3, 1), with_features=True, generator=image_generators(0, [0, 1], False))
    assert out["latents"].shape == (2, 32, 4, 4) and out["latents_sv"].shape == (2, 16, 4, 4)
    assert out["feats_dino"].shape == (2, 32, 4, 4)
    same = enc.encode(u8.float() / 255, with_features=False, generator=image_generators(0, [0, 1], False))
    assert set(same) == {"latents", "latents_sv"}
    assert torch.equal(same["latents"], out["latents"]) and torch.equal(same["latents_sv"], out["latents_sv"])
    assert torch.equal(out["latents_sv"], enc.semantic.model.encode_latent(out["feats_dino"]))  # posterior mean
    save_semvae(tmp_path / "sv.safetensors", enc.semantic.model, enc.semantic.model.args)
    sem = SemanticEncoder.from_pretrained(tmp_path / "sv.safetensors")
    assert torch.equal(sem(out["feats_dino"]), out["latents_sv"])
    with pytest.raises(FileNotFoundError, match="sv_missing"):
        SemanticEncoder.from_pretrained(tmp_path / "sv_missing.safetensors")
