"""Storage tiers: host arena, zarr disk."""
