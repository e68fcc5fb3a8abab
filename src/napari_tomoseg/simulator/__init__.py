"""The simulator: tomograms with exact ground truth, and the demo built on it."""
