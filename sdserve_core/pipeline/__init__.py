"""The one way a diffusers pipeline is run: PipelineCall (call.py) says what to run, one module per task turns it
into the pipeline's arguments (generate.py, edit.py, inpaint.py), steps.py times and observes the denoising steps,
and run.py builds the family's pipeline and calls it. The server's batches, its warm-up and calibration, and the
sidecar's quality render all go through run.py; nothing else in the repository calls a diffusers pipeline."""
