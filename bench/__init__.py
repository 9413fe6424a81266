"""Side-by-side benchmark: diffusers called directly versus sdserve end to end (`python -m bench`)."""
