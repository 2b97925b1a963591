"""Command-line tools that plan or inspect runs without running them (memory planner)."""
