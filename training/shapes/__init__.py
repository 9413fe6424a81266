"""The "shapes" family: tiny Stable-Diffusion-architecture models trained on procedural shapes."""
