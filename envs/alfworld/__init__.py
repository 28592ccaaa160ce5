"""ALFWorld: the Gymnasium env, its in-process game engine and the embedded-game generator.

``data/`` holds the shipped (embedded) games.
"""
