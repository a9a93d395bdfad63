"""Unit tests of Tenaya's pure logic: byte literals and small transcripts, no processes."""
