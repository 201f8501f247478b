"""``seglab report``: what a store says about whether its labels can be trusted, as data and as HTML."""
