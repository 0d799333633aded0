"""Tests of the batch-size experiment (a package, so pytest names them ``experiments.batch_size.tests.*``)."""
