"""Quality yardstick: scores the shapes model family through a live sdserve server."""
