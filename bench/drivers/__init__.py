"""The drivers: many runs at once (sweep, leaderboard) and the CI regression of reward curves (regress)."""
