"""Tests of the TypeScript and Go clients against a live sdserve."""
