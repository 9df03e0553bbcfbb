"""What a segmented slide leaves behind: the pyramidal mask, GeoJSON objects, tables and a picture."""
