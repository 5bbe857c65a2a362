"""Side-by-side benchmarks: nanoseek vs the reference implementation, in one process, same inputs."""
