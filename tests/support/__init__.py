"""Test helpers that must not depend on the product's own code."""
