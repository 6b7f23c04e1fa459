"""The bottom layer: what every phase shares, importing nothing of ours and no
torch.distributed. The plan and its validation (`plan`), the rank layout (`layout`), typed
placements and parameter layouts (`placement`), metadata key names (`meta`), fx helpers
(`fx_utils`) and the pure pipeline schedules (`schedules`)."""
