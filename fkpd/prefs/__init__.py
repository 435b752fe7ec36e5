"""Preferences: segments, pairs and their labels (scripted teachers, preference files)."""
