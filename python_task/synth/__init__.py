"""A synthetic cohort of annotated H&E whole-slide images (the demo's, the tests' and the benchmarks' data)."""
