"""Measuring the training step: throughput and MFU (``throughput.py``), the official code's own step beside
ours (``official_step.py``, ``timing_inputs.py``), the CPU-counted H100 cost model (``cost_model.py``,
``compile_count.py``, ``dispatch_count.py``), the data loader (``loader.py``), the layout planner
(``planner.py``) and the GPU check (``gpu_check.py``). An app layer: it drives the trainer and the data pipeline,
nothing below imports it; the ``sfd`` commands (``sfd_scale/apps``) and ``benchmarks/`` are its front end."""
