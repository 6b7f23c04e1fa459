"""Scripts that measure this machine or drive the packages; they may import anything, and
nothing in the packages imports them."""
