"""The build side of sdkiln: recipes, the engine, and one module per stage."""
