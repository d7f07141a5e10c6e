// visionserve playground: plain browser JavaScript, no build step, nothing fetched from elsewhere.
// Every call goes to this server's own routes with the key as a Bearer token.
"use strict";

const KEY_STORE = "visionserve.apiKey";
const state = {
  b64: null, // the uploaded file, base64
  localId: null, // its SHA-256 (the server's image_id), when the browser can hash (secure contexts)
  width: 0,
  height: 0,
  bitmap: null,
  ids: { sam2: null, sam3: null }, // image_id each family has cached
  points: [],
  labels: [],
};

const $ = (id) => document.getElementById(id);

// ------------------------------------------------------------------ key and HTTP

function apiKey() {
  return $("api-key").value.trim();
}

function rememberKey() {
  if ($("remember-key").checked && apiKey()) localStorage.setItem(KEY_STORE, apiKey());
  else localStorage.removeItem(KEY_STORE);
}

function headers(imageKey) {
  const out = { "Content-Type": "application/json" };
  if (apiKey()) out.Authorization = "Bearer " + apiKey();
  if (imageKey) out["X-Image-Key"] = imageKey; // lets a load balancer keep the image on one replica
  return out;
}

async function failure(resp) {
  const data = await resp.json().catch(() => ({}));
  const err = new Error((data.error && data.error.message) || `HTTP ${resp.status}`);
  err.status = resp.status;
  err.code = data.error && data.error.code;
  return err;
}

async function call(route, body, imageKey) {
  const resp = await fetch(route, { method: "POST", headers: headers(imageKey), body: JSON.stringify(body) });
  if (!resp.ok) throw await failure(resp);
  return resp.json();
}

async function embed(family) {
  const r = await call(`/${family}/embed`, { image: state.b64 }, state.localId);
  state.ids[family] = r.image_id;
  return r;
}

// The image goes once to /<family>/embed; later calls send only its image_id, and embed it again
// if the server has evicted it.
async function withImageId(family, route, body) {
  if (!state.ids[family]) await embed(family);
  const send = () => call(route, { ...body, image_id: state.ids[family] }, state.ids[family]);
  try {
    return await send();
  } catch (err) {
    if (err.code !== "image_not_cached") throw err;
    await embed(family);
    return send();
  }
}

function status(id, text, isError = false) {
  const el = $(id);
  el.textContent = text;
  el.classList.toggle("error", isError);
}

async function guarded(statusId, work) {
  if (!state.b64) return status(statusId, "Upload an image first.", true);
  status(statusId, "working...");
  try {
    await work();
  } catch (err) {
    status(statusId, err.message, true);
  }
}

// ------------------------------------------------------------------ bytes

function toBase64(bytes) {
  let text = "";
  for (let i = 0; i < bytes.length; i += 0x8000) {
    text += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  }
  return btoa(text);
}

function fromBase64(text) {
  const raw = atob(text);
  const out = new Uint8Array(raw.length);
  for (let i = 0; i < raw.length; i++) out[i] = raw.charCodeAt(i);
  return out;
}

function float32s(text) {
  return new Float32Array(fromBase64(text).buffer); // little-endian, as every browser CPU is
}

async function sha256Hex(bytes) {
  if (!(window.crypto && crypto.subtle)) return null; // plain http to a remote host
  const digest = new Uint8Array(await crypto.subtle.digest("SHA-256", bytes));
  return Array.from(digest, (b) => b.toString(16).padStart(2, "0")).join("");
}

// ------------------------------------------------------------------ image

async function loadImage(file) {
  const bytes = new Uint8Array(await file.arrayBuffer());
  state.bitmap = await createImageBitmap(file, { imageOrientation: "from-image" });
  state.width = state.bitmap.width;
  state.height = state.bitmap.height;
  state.b64 = toBase64(bytes);
  state.localId = await sha256Hex(bytes);
  state.ids = { sam2: null, sam3: null };
  for (const name of ["sam2", "sam3", "clip"]) {
    const base = $(`${name}-base`);
    base.width = state.width;
    base.height = state.height;
    base.getContext("2d").drawImage(state.bitmap, 0, 0);
    clear($(`${name}-overlay`));
  }
  clearPoints();
  $("rmbg-result").removeAttribute("src");
  const id = state.localId ? `, image_id ${state.localId.slice(0, 12)}...` : "";
  status("image-info", `${file.name}: ${state.width}x${state.height}, ${bytes.length} bytes${id}`);
}

function clear(canvas) {
  canvas.width = state.width;
  canvas.height = state.height;
  canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height);
  return canvas.getContext("2d");
}

function colour(i, alpha) {
  const hue = (i * 137.5) % 360;
  return `hsla(${hue}, 85%, 50%, ${alpha})`;
}

// colour(i) as [r, g, b] for ImageData (CSS's hsl-to-rgb rule)
function rgb(i) {
  const hue = (i * 137.5) % 360;
  const a = 0.85 * 0.5;
  const f = (n) => {
    const k = (n + hue / 30) % 12;
    return Math.round(255 * (0.5 - a * Math.max(-1, Math.min(k - 3, 9 - k, 1))));
  };
  return [f(0), f(8), f(4)];
}

// ------------------------------------------------------------------ SAM 2

function clearPoints() {
  state.points = [];
  state.labels = [];
  clear($("sam2-overlay"));
  $("sam2-overlay").dataset.maskPixels = "0";
  status("sam2-status", "");
}

// Run lengths of a COCO compressed RLE string (pycocotools): 5 bits a character from '0', the
// 6th bit continues a number, the last bit read its sign; from the third run on each value is a
// difference to the run two places back.
function rleCounts(text) {
  const counts = [];
  let pos = 0;
  while (pos < text.length) {
    let value = 0;
    let shift = 0;
    let more = true;
    while (more) {
      const c = text.charCodeAt(pos++) - 48;
      value |= (c & 0x1f) << shift;
      more = (c & 0x20) !== 0;
      shift += 5;
      if (!more && c & 0x10) value |= -1 << shift;
    }
    if (counts.length > 2) value += counts[counts.length - 2];
    counts.push(value);
  }
  return counts;
}

// A row-major 0/1 mask from {size: [H, W], counts}: runs are column-major, background first.
function decodeRle(rle) {
  const [h, w] = rle.size;
  const mask = new Uint8Array(h * w);
  let at = 0;
  let inside = false;
  for (const run of rleCounts(rle.counts)) {
    if (inside) for (let i = at; i < at + run; i++) mask[(i % h) * w + Math.floor(i / h)] = 1;
    at += run;
    inside = !inside;
  }
  return mask;
}

function drawMask(mask) {
  const canvas = $("sam2-overlay");
  const ctx = clear(canvas);
  const img = ctx.createImageData(state.width, state.height);
  let count = 0;
  for (let i = 0; i < mask.length; i++) {
    if (!mask[i]) continue;
    count++;
    img.data.set([255, 0, 200, 150], i * 4);
  }
  ctx.putImageData(img, 0, 0);
  for (let k = 0; k < state.points.length; k++) {
    const [x, y] = state.points[k];
    ctx.beginPath();
    ctx.arc(x, y, Math.max(3, state.width / 120), 0, 2 * Math.PI);
    ctx.fillStyle = state.labels[k] ? "#00c853" : "#d50000";
    ctx.fill();
  }
  canvas.dataset.maskPixels = String(count);
  return count;
}

async function click(event, label) {
  event.preventDefault();
  const rect = $("sam2-overlay").getBoundingClientRect();
  const x = ((event.clientX - rect.left) * state.width) / rect.width;
  const y = ((event.clientY - rect.top) * state.height) / rect.height;
  state.points.push([Math.round(x * 10) / 10, Math.round(y * 10) / 10]);
  state.labels.push(event.shiftKey || label === 0 ? 0 : 1);
  await guarded("sam2-status", async () => {
    const single = state.points.length === 1; // one point is ambiguous: three masks, the best one back
    const r = await withImageId("sam2", "/sam2/prompt_mask", {
      point_coords: state.points,
      point_labels: state.labels,
      multimask_output: single,
      best_only: true,
      mask_encoding: "coco_rle",
      return_low_res_masks: false,
    });
    const iou = float32s(r.iou_predictions)[0];
    const count = drawMask(decodeRle(r.masks[0]));
    status(
      "sam2-status",
      `${state.points.length} point(s); mask of ${count} px, predicted IoU ${iou.toFixed(3)} (${r.model})`
    );
  });
}

// ------------------------------------------------------------------ video (SAM 2 clicks, SAM 3 text)

// family: whose session is open on the clip; drawn: per streamed frame, [obj_id, pixels] per object
const video = { frames: [], id: null, family: "sam2", points: [], labels: [], areas: [], drawn: [] };
const sessions = (family = video.family) => `/${family}/video/sessions`;

function once(target, event) {
  return new Promise((resolve, reject) => {
    target.addEventListener(event, resolve, { once: true });
    target.addEventListener("error", () => reject(new Error("the browser cannot play this video")), { once: true });
  });
}

function frameCanvas(width, height, draw) {
  const c = document.createElement("canvas");
  c.width = width;
  c.height = height;
  draw(c.getContext("2d"));
  return c;
}

// 12 frames of the uploaded image sliding right, 3 px a frame: a clip with known motion
async function clipFromImage() {
  await guarded("video-status", async () => {
    const frames = [];
    for (let t = 0; t < 12; t++) {
      frames.push(frameCanvas(state.width, state.height, (ctx) => ctx.drawImage(state.bitmap, 3 * t, 0)));
    }
    await openClip(frames);
  });
}

// up to 24 frames of a video file, 8 a second, grabbed by seeking a <video> element
async function clipFromVideo(file) {
  status("video-status", "reading the video...");
  try {
    const el = document.createElement("video");
    el.muted = true;
    el.src = URL.createObjectURL(file);
    await once(el, "loadeddata");
    const n = Math.max(1, Math.min(24, Math.floor(el.duration * 8)));
    const frames = [];
    for (let t = 0; t < n; t++) {
      el.currentTime = (t * el.duration) / n;
      await once(el, "seeked");
      frames.push(frameCanvas(el.videoWidth, el.videoHeight, (ctx) => ctx.drawImage(el, 0, 0)));
    }
    URL.revokeObjectURL(el.src);
    await openClip(frames);
  } catch (err) {
    status("video-status", err.message, true);
  }
}

// a session on the clip for the family chosen (the one open before is deleted)
async function openClip(frames) {
  if (video.id) await fetch(`${sessions()}/${video.id}`, { method: "DELETE", headers: headers() });
  const family = $("video-family").value;
  Object.assign(video, { frames, id: null, family, points: [], labels: [], areas: [], drawn: [] });
  const b64s = frames.map((c) => c.toDataURL("image/png").split(",")[1]);
  const r = await call(sessions(), { frames: b64s });
  video.id = r.session_id;
  showFrame(0);
  clear($("video-overlay"));
  const next = family === "sam3" ? "type a text and track" : "click the object";
  status("video-status", `${family} session of ${r.num_frames} frames, ${r.width}x${r.height}: ${next}`);
}

async function switchVideoFamily() {
  if (!video.frames.length) return;
  status("video-status", "working...");
  try {
    await openClip(video.frames);
  } catch (err) {
    status("video-status", err.message, true);
  }
}

// one object's mask as 0/1 per pixel, row-major: coco_rle (SAM 3) or a base64 PNG of 0/255 (SAM 2)
async function objectMask(mask, width, height) {
  if (typeof mask !== "string") return decodeRle(mask);
  const bitmap = await createImageBitmap(new Blob([fromBase64(mask)], { type: "image/png" }));
  const pixels = frameCanvas(width, height, (c) => c.drawImage(bitmap, 0, 0))
    .getContext("2d")
    .getImageData(0, 0, width, height).data;
  const out = new Uint8Array(width * height);
  for (let i = 0; i < out.length; i++) out[i] = pixels[i * 4] >= 128 ? 1 : 0;
  return out;
}

function showFrame(index) {
  const c = video.frames[index];
  const base = $("video-base");
  base.width = c.width;
  base.height = c.height;
  base.getContext("2d").drawImage(c, 0, 0);
}

// a frame's objects, each drawn in its object's colour; [obj_id, pixels drawn] per object
async function drawObjects(objects, points) {
  const base = $("video-base");
  const canvas = $("video-overlay");
  canvas.width = base.width;
  canvas.height = base.height;
  const ctx = canvas.getContext("2d");
  const out = ctx.createImageData(canvas.width, canvas.height);
  const drawn = [];
  for (const obj of objects) {
    const mask = await objectMask(obj.mask, canvas.width, canvas.height);
    const paint = [...rgb(obj.obj_id), 150];
    let count = 0;
    for (let i = 0; i < mask.length; i++) {
      if (!mask[i]) continue;
      count++;
      out.data.set(paint, i * 4);
    }
    drawn.push([obj.obj_id, count]);
  }
  ctx.putImageData(out, 0, 0);
  (points || []).forEach(([x, y], k) => {
    ctx.beginPath();
    ctx.arc(x, y, Math.max(3, canvas.width / 120), 0, 2 * Math.PI);
    ctx.fillStyle = video.labels[k] ? "#00c853" : "#d50000";
    ctx.fill();
  });
  const count = drawn.reduce((sum, [, n]) => sum + n, 0);
  canvas.dataset.maskPixels = String(count);
  return drawn;
}

const total = (drawn) => drawn.reduce((sum, [, n]) => sum + n, 0);

async function videoClick(event, label) {
  event.preventDefault();
  if (!video.id) return status("video-status", "Make a clip first.", true);
  if (video.family !== "sam2") return status("video-status", "Clicks are for SAM 2; SAM 3 takes a text.", true);
  const canvas = $("video-overlay");
  const rect = canvas.getBoundingClientRect();
  const x = ((event.clientX - rect.left) * canvas.width) / rect.width;
  const y = ((event.clientY - rect.top) * canvas.height) / rect.height;
  video.points.push([Math.round(x * 10) / 10, Math.round(y * 10) / 10]);
  video.labels.push(event.shiftKey || label === 0 ? 0 : 1);
  status("video-status", "working...");
  try {
    showFrame(0);
    const r = await call(`${sessions()}/${video.id}/prompts`, {
      frame_index: 0,
      obj_id: 1,
      points: video.points,
      labels: video.labels,
      mask_encoding: "png",
    });
    const count = total(await drawObjects(r.objects, video.points));
    status("video-status", `${video.points.length} point(s) on frame 0; mask of ${count} px`);
  } catch (err) {
    status("video-status", err.message, true);
  }
}

// SAM 3: the text on its frame (a new text starts the session's tracking over); its instances drawn
async function promptText() {
  const text = $("video-text").value.trim();
  if (!text) throw new Error("Type a text for SAM 3.");
  const frameIndex = Number($("video-frame").value) || 0;
  showFrame(Math.min(frameIndex, video.frames.length - 1));
  const r = await call(`${sessions()}/${video.id}/prompts`, { frame_index: frameIndex, text, mask_encoding: "coco_rle" });
  await drawObjects(r.objects);
}

// the NDJSON stream: each line is drawn as soon as it arrives
async function track() {
  if (!video.id) return status("video-status", "Make a clip first.", true);
  const sam3 = video.family === "sam3";
  if (!sam3 && !video.points.length) return status("video-status", "Click the object first.", true);
  status("video-status", "tracking...");
  try {
    if (sam3) await promptText();
    const resp = await fetch(`${sessions()}/${video.id}/propagate`, {
      method: "POST",
      headers: headers(),
      body: JSON.stringify({ mask_encoding: sam3 ? "coco_rle" : "png" }),
    });
    if (!resp.ok) throw await failure(resp);
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let text = "";
    video.areas = [];
    video.drawn = [];
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      text += decoder.decode(value, { stream: true });
      let end;
      while ((end = text.indexOf("\n")) >= 0) {
        const line = text.slice(0, end);
        text = text.slice(end + 1);
        if (!line) continue;
        const part = JSON.parse(line);
        if (part.error) throw new Error(part.error.message);
        if (part.done) {
          $("video-overlay").dataset.areas = video.areas.join(",");
          status("video-status", `tracked ${part.frames} frames at ${part.frames_per_s} frames/s`);
          continue;
        }
        showFrame(part.frame_index);
        const drawn = await drawObjects(part.objects);
        video.drawn.push(drawn);
        video.areas.push(total(drawn));
        status("video-status", `frame ${part.frame_index + 1} of ${video.frames.length}: ${drawn.length} object(s)`);
      }
    }
  } catch (err) {
    status("video-status", err.message, true);
  }
}

// ------------------------------------------------------------------ SAM 3

async function findInstances(event) {
  event.preventDefault();
  const prompts = $("sam3-prompts").value.split(",").map((p) => p.trim()).filter(Boolean);
  if (!prompts.length) return status("sam3-status", "Type at least one prompt.", true);
  await guarded("sam3-status", async () => {
    const threshold = $("sam3-threshold").value;
    const body = threshold === "" ? { prompts } : { prompts, score_threshold: Number(threshold) };
    const r = await withImageId("sam3", "/sam3/predict", body);
    const canvas = $("sam3-overlay");
    const ctx = clear(canvas);
    const list = $("sam3-list");
    list.textContent = "";
    ctx.lineWidth = Math.max(2, state.width / 300);
    r.results.forEach((inst, i) => {
      ctx.beginPath();
      inst.polygon.forEach(([x, y], k) => (k ? ctx.lineTo(x, y) : ctx.moveTo(x, y)));
      ctx.closePath();
      ctx.fillStyle = colour(i, 0.35);
      ctx.fill();
      ctx.strokeStyle = colour(i, 1);
      ctx.stroke();
      const [x1, y1, x2, y2] = inst.bbox;
      ctx.setLineDash([6, 4]);
      ctx.strokeRect(x1, y1, x2 - x1, y2 - y1);
      ctx.setLineDash([]);
      const item = document.createElement("li");
      item.textContent = `${inst.prompt}: score ${inst.score.toFixed(3)}, ${inst.area} px`;
      item.style.color = colour(i, 1);
      list.appendChild(item);
    });
    canvas.dataset.instances = String(r.results.length);
    status("sam3-status", `${r.results.length} instance(s) for ${prompts.length} prompt(s) (${r.model})`);
  });
}

// ------------------------------------------------------------------ CLIP

function heat(t) {
  // blue -> cyan -> green -> yellow -> red
  const stops = [[0, 0, 255], [0, 255, 255], [0, 255, 0], [255, 255, 0], [255, 0, 0]];
  const at = Math.min(Math.max(t, 0), 1) * (stops.length - 1);
  const i = Math.min(Math.floor(at), stops.length - 2);
  const f = at - i;
  return stops[i].map((v, c) => Math.round(v + (stops[i + 1][c] - v) * f));
}

async function showHeatmap(event) {
  event.preventDefault();
  const text = $("clip-text").value.trim();
  if (!text) return status("clip-status", "Type a text.", true);
  await guarded("clip-status", async () => {
    const r = await call("/clip/similarity", {
      image: state.b64,
      text,
      load_size: Number($("clip-load-size").value) || null,
      ret_patches: false,
      softmax: 0,
      similarity: "cosine",
    });
    const [h, w] = r.shape;
    const values = float32s(r.similarity_map);
    let lo = Infinity;
    let hi = -Infinity;
    let top = 0;
    values.forEach((v, i) => {
      if (v < lo) lo = v;
      if (v > hi) {
        hi = v;
        top = i;
      }
    });
    const grid = document.createElement("canvas");
    grid.width = w;
    grid.height = h;
    const gctx = grid.getContext("2d");
    const img = gctx.createImageData(w, h);
    values.forEach((v, i) => img.data.set([...heat((v - lo) / (hi - lo || 1)), 255], i * 4));
    gctx.putImageData(img, 0, 0);
    const canvas = $("clip-overlay");
    const ctx = clear(canvas);
    ctx.globalAlpha = 0.6;
    ctx.drawImage(grid, 0, 0, state.width, state.height); // the map covers the (resized) image
    Object.assign(canvas.dataset, { min: String(lo), max: String(hi), shape: `${h}x${w}` });
    const sx = Math.round((((top % w) + 0.5) * state.width) / w);
    const sy = Math.round(((Math.floor(top / w) + 0.5) * state.height) / h);
    status("clip-status", `cosine ${lo.toFixed(3)} .. ${hi.toFixed(3)}, highest near (${sx}, ${sy}) (${r.model})`);
  });
}

// ------------------------------------------------------------------ RMBG

async function cutOut() {
  await guarded("rmbg-status", async () => {
    const r = await call("/rmbg/remove", { image: state.b64 });
    const img = $("rmbg-result");
    await new Promise((resolve, reject) => {
      img.onload = resolve;
      img.onerror = () => reject(new Error("the answer is not a PNG the browser can show"));
      img.src = `data:image/png;base64,${r.image}`;
    });
    status("rmbg-status", `${r.width}x${r.height} cut-out (${r.model})`);
  });
}

// ------------------------------------------------------------------ families served

// A panel shows only if this server serves its family: /<family>/health (open, no key) is 404
// for a family the config leaves out and says "unavailable" for one whose weights are missing.
const PANELS = ["sam2", "sam3", "clip", "rmbg"];

async function served(family) {
  try {
    const resp = await fetch(`/${family}/health`);
    if (resp.status === 404) return false;
    const data = await resp.json().catch(() => ({}));
    return data.status !== "unavailable";
  } catch (err) {
    return false;
  }
}

async function showServedPanels() {
  const shown = await Promise.all(PANELS.map(served));
  PANELS.forEach((family, i) => {
    $(`${family}-panel`).hidden = !shown[i];
  });
  const sam3 = shown[PANELS.indexOf("sam3")];
  $("video-sam3-choice").hidden = !sam3; // the video panel's SAM 3 text choice too
  if (!sam3) $("video-family").value = "sam2";
  const missing = PANELS.filter((_, i) => !shown[i]);
  $("not-served").textContent = missing.length ? `Not served by this server: ${missing.join(", ")}.` : "";
}

// ------------------------------------------------------------------ wiring

window.addEventListener("DOMContentLoaded", () => {
  showServedPanels();
  const saved = localStorage.getItem(KEY_STORE);
  if (saved) {
    $("api-key").value = saved;
    $("remember-key").checked = true;
  }
  $("api-key").addEventListener("change", rememberKey);
  $("remember-key").addEventListener("change", rememberKey);
  $("key-form").addEventListener("submit", (e) => e.preventDefault());
  $("image-file").addEventListener("change", async (e) => {
    if (!e.target.files.length) return;
    try {
      await loadImage(e.target.files[0]);
    } catch (err) {
      status("image-info", `Cannot read this image: ${err.message}`, true);
    }
  });
  $("sam2-overlay").addEventListener("click", (e) => click(e, 1));
  $("sam2-overlay").addEventListener("contextmenu", (e) => click(e, 0));
  $("sam2-reset").addEventListener("click", clearPoints);
  $("video-from-image").addEventListener("click", clipFromImage);
  $("video-file").addEventListener("change", (e) => e.target.files.length && clipFromVideo(e.target.files[0]));
  $("video-overlay").addEventListener("click", (e) => videoClick(e, 1));
  $("video-overlay").addEventListener("contextmenu", (e) => videoClick(e, 0));
  $("video-track").addEventListener("click", track);
  $("video-family").addEventListener("change", switchVideoFamily);
  $("sam3-form").addEventListener("submit", findInstances);
  $("clip-form").addEventListener("submit", showHeatmap);
  $("rmbg-run").addEventListener("click", cutOut);
});
