"""Review results in a browser: `python -m custom view OUT_DIR [--slides DIR]`.

catalog.py  which slides, masks, truths, GeoJSON and figures an output folder holds
dzi.py      Deep Zoom geometry and tiles, read through custom.wsi.reader
assets.py   the page's files and the OpenSeadragon build npm installs
server.py   the localhost HTTP server (standard library, one thread per request)
static/     the page: index.html, viewer.js, viewer.css
"""
