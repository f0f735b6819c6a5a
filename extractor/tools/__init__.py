"""Tools around the job: a look at an output, the built-in sample, moving an old output."""
