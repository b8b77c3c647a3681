"""Long fuzzing runs (``make fuzz``): the same tests as ``make test``, with many more examples."""
