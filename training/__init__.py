"""Training code for sdserve's own small models."""
