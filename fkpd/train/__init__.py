"""Training: losses, behaviour cloning, alignment, the round engine and the headless loop."""
