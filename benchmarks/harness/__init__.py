"""The pieces every benchmark scenario is built from: load generators, the
processes under test, and what a result records about the machine."""
