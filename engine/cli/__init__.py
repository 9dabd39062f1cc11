"""The segment-topsort command line: thin commands over the package."""
