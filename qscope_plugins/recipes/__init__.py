"""The Qwen-Scope report's practices as recipes: pure math in plain functions, model plumbing via ``backends``."""
