"""Jobs the compatibility matrix runs through every Gearman client and server."""
