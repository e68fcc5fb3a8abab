"""Learning: training sets, architectures, training, checkpoints, the network file and the
shipped starting networks."""
