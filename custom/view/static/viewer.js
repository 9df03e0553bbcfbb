// The review page: a slide list, OpenSeadragon with the mask and truth as tiled overlays, the
// GeoJSON objects as SVG outlines, and an object list that zooms to each one.
// Everything shown comes from /api/slides; text is set with textContent, never parsed as HTML.
"use strict";

const SVG_NS = "http://www.w3.org/2000/svg";
const ZOOM_MARGIN = 1.5; // an object fills two thirds of the view it is zoomed to

// Page state, exposed so a person (or the browser test) can inspect the viewer from the console.
const state = {
  viewer: null,
  slides: [],
  slide: null,
  items: {}, // kind ("base", "mask", "truth") -> OpenSeadragon TiledImage
  features: [],
  loaded: false, // every visible tiled image has drawn all tiles of the current view
  animating: false,
  zoomedTo: null, // index of the object last zoomed to
  viewImageRect: () => {
    const base = state.items.base;
    if (!base) return null;
    const r = base.viewportToImageRectangle(state.viewer.viewport.getBounds(true));
    return { x: r.x, y: r.y, width: r.width, height: r.height };
  },
};
window.holoView = state;

const $ = (id) => document.getElementById(id);

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function figure(value, digits) {
  return value === null || value === undefined ? "—" : Number(value).toFixed(digits);
}

function showMessage(text) {
  $("message").textContent = text;
  $("message").hidden = !text;
}

function renderSlideList() {
  const list = $("slides");
  list.replaceChildren();
  for (const slide of state.slides) {
    const item = element("li");
    item.dataset.name = slide.name;
    item.append(element("div", "name", slide.name));
    const m = slide.metrics;
    item.append(
      element(
        "div",
        "figures",
        `WSI Dice ${figure(m.wsi_dice, 3)} · ${m.object_count ?? "—"} objects · ` +
          `${figure(m.glomeruli_per_mm2, 2)} glomeruli/mm²`,
      ),
    );
    if (slide.error) item.append(element("div", "error", slide.error));
    for (const note of slide.notes) item.append(element("div", "note", note));
    item.addEventListener("click", () => openSlide(slide));
    list.append(item);
  }
}

function makeViewer() {
  const viewer = OpenSeadragon({
    id: "viewer",
    prefixUrl: "/osd/images/",
    // The 2D-canvas drawer draws the same pixels on every machine, GPU or not.
    drawer: "canvas",
    showNavigator: true,
    maxZoomPixelRatio: 4,
    gestureSettingsMouse: { clickToZoom: false },
  });
  const svg = document.createElementNS(SVG_NS, "svg");
  svg.setAttribute("class", "outlines");
  const group = document.createElementNS(SVG_NS, "g");
  svg.append(group);
  viewer.canvas.append(svg);
  state.outlines = { svg, group };
  for (const event of ["animation", "update-viewport", "resize", "open"]) {
    viewer.addHandler(event, placeOutlines);
  }
  viewer.addHandler("animation-start", () => (state.animating = true));
  viewer.addHandler("animation-finish", () => (state.animating = false));
  viewer.world.addHandler("add-item", (event) => {
    event.item.addHandler("fully-loaded-change", updateLoaded);
  });
  return viewer;
}

// OpenSeadragon loads no tiles for a hidden (opacity 0) image, so only the visible ones count.
function updateLoaded() {
  const items = Object.values(state.items);
  const visible = items.filter((item) => item.getOpacity() > 0);
  state.loaded = items.length > 0 && visible.every((item) => item.getFullyLoaded());
}

// The outlines are drawn in level-0 pixel coordinates; one transform maps them onto the view.
function placeOutlines() {
  const base = state.items.base;
  if (!base) return;
  const origin = base.imageToViewerElementCoordinates(new OpenSeadragon.Point(0, 0));
  const width = base.getContentSize().x;
  const corner = base.imageToViewerElementCoordinates(new OpenSeadragon.Point(width, 0));
  const scale = (corner.x - origin.x) / width;
  state.outlines.group.setAttribute("transform", `translate(${origin.x} ${origin.y}) scale(${scale})`);
}

function openSlide(slide) {
  state.slide = slide;
  state.items = {};
  state.loaded = false;
  state.zoomedTo = null;
  location.hash = encodeURIComponent(slide.name);
  for (const item of $("slides").children) item.classList.toggle("active", item.dataset.name === slide.name);
  state.outlines.group.replaceChildren();
  $("objects").replaceChildren();
  $("object-count").textContent = "";
  $("truth-on").disabled = !slide.dzi.truth;
  if (slide.error) {
    state.viewer.close();
    showMessage(slide.error);
    return;
  }
  showMessage("");
  const kinds = [["base", slide.dzi.slide || slide.dzi.mask], ["mask", slide.dzi.mask]];
  if (slide.dzi.truth) kinds.push(["truth", slide.dzi.truth]);
  state.viewer.addOnceHandler("open", () => {
    kinds.forEach(([kind], index) => {
      state.items[kind] = state.viewer.world.getItemAt(index);
    });
    applyLayers();
    placeOutlines();
    updateLoaded();
  });
  state.viewer.open(kinds.map(([, url]) => ({ tileSource: url })));
  if (slide.geojson) loadObjects(slide);
}

function applyLayers() {
  const { mask, truth } = state.items;
  if (mask) mask.setOpacity($("mask-on").checked ? $("mask-opacity").value / 100 : 0);
  if (truth) truth.setOpacity($("truth-on").checked ? 1 : 0);
  state.outlines.svg.style.display = $("outlines-on").checked ? "" : "none";
  updateLoaded();
}

async function loadObjects(slide) {
  const response = await fetch(slide.geojson);
  if (!response.ok) {
    $("objects").append(element("li", "error", `GeoJSON: ${(await response.text()).trim()}`));
    return;
  }
  const collection = await response.json();
  if (state.slide !== slide) return; // another slide was opened meanwhile
  state.features = collection.features.map(describeFeature);
  $("object-count").textContent = `(${state.features.length})`;
  const paths = document.createDocumentFragment();
  const items = document.createDocumentFragment();
  state.features.forEach((feature, index) => {
    const path = document.createElementNS(SVG_NS, "path");
    path.setAttribute("d", feature.path);
    feature.node = path;
    paths.append(path);
    const item = element("li", null, feature.label);
    item.dataset.index = index;
    item.addEventListener("click", () => zoomTo(index));
    items.append(item);
  });
  state.outlines.group.append(paths);
  $("objects").append(items);
}

function describeFeature(feature, index) {
  const geometry = feature.geometry || {};
  const polygons =
    geometry.type === "Polygon" ? [geometry.coordinates] : geometry.type === "MultiPolygon" ? geometry.coordinates : [];
  const rings = polygons.flat(1);
  const outer = polygons.map((polygon) => polygon[0]).flat(1);
  const xs = outer.map((p) => p[0]);
  const ys = outer.map((p) => p[1]);
  const props = feature.properties || {};
  const area = props.area_um2 ?? (props.measurements || {})["Area um^2"];
  const name = props.name || `${(props.classification || {}).name || "object"} ${index + 1}`;
  const box = xs.length
    ? { x: Math.min(...xs), y: Math.min(...ys), width: Math.max(...xs) - Math.min(...xs), height: Math.max(...ys) - Math.min(...ys) }
    : null;
  return {
    label: area === null || area === undefined ? name : `${name} · ${Math.round(area).toLocaleString()} µm²`,
    path: rings.map((ring) => "M" + ring.map((p) => `${p[0]} ${p[1]}`).join("L") + "Z").join(""),
    box,
  };
}

function zoomTo(index) {
  const feature = state.features[index];
  const base = state.items.base;
  if (!feature || !feature.box || !base) return;
  const { x, y, width, height } = feature.box;
  const side = Math.max(width, height, 1) * ZOOM_MARGIN;
  const rect = new OpenSeadragon.Rect(x + width / 2 - side / 2, y + height / 2 - side / 2, side, side);
  const viewport = state.viewer.viewport;
  viewport.fitBounds(base.imageToViewportRectangle(rect));
  for (const f of state.features) f.node.classList.remove("selected");
  feature.node.classList.add("selected");
  for (const item of $("objects").children) item.classList.toggle("active", Number(item.dataset.index) === index);
  // the spring starts on the next frame: until it ends, the view is not yet the object's
  if (viewport.getBounds(true).equals(viewport.getBounds())) {
    state.zoomedTo = index;
  } else {
    state.animating = true;
    state.viewer.addOnceHandler("animation-finish", () => (state.zoomedTo = index));
  }
}

async function main() {
  state.viewer = makeViewer();
  for (const id of ["mask-on", "mask-opacity", "outlines-on", "truth-on"]) {
    $(id).addEventListener("input", applyLayers);
  }
  const response = await fetch("/api/slides");
  state.slides = (await response.json()).slides;
  renderSlideList();
  const wanted = decodeURIComponent(location.hash.slice(1));
  const first =
    state.slides.find((s) => s.name === wanted) || state.slides.find((s) => !s.error) || state.slides[0];
  if (first) openSlide(first);
}

main().catch((error) => showMessage(`the page failed: ${error}`));
