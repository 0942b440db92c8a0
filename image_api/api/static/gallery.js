// The gallery: plain JavaScript against the service's API, as a web client would use it.
// The API key is kept in sessionStorage (this tab only); images are shown through the
// signed URLs the API returns (thumbnailUrl, imageUrl), so <img> needs no key.
"use strict";

const KEY = "image-api-key";
const $ = (id) => document.getElementById(id);
let cursor = null;
let loading = false;
let generation = 0; // one per start(): a page a previous key asked for is dropped
let current = null; // the image the detail view shows

function key() {
  return sessionStorage.getItem(KEY);
}

function headers() {
  const value = key();
  return value ? { Authorization: `Bearer ${value}` } : {};
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: { ...headers(), ...(options.headers || {}) } });
  if (response.status === 401) {
    askForKey("That key was refused; enter another.");
    throw new Error("A valid API key is needed");
  }
  const body = response.status === 204 ? null : await response.json();
  if (!response.ok) {
    const error = new Error(explain(response.status, body));
    error.status = response.status;
    throw error;
  }
  return body;
}

function explain(status, body) {
  const message = body && body.message ? body.message : "Request failed";
  return `${message} (${status}${body && body.code ? ` ${body.code}` : ""})`;
}

function askForKey(message) {
  if ($("detail").open) $("detail").close();
  $("key-form").hidden = false;
  $("uploader").hidden = true;
  $("images").hidden = true;
  $("change-key").hidden = true;
  $("key-status").textContent = message || "";
  $("key").value = "";
  $("key").focus();
}

function start() {
  $("key-form").hidden = true;
  $("uploader").hidden = false;
  $("images").hidden = false;
  $("change-key").hidden = !key();
  $("uploads").replaceChildren();
  $("grid").replaceChildren();
  $("status").textContent = "";
  $("status").classList.remove("error");
  cursor = null;
  generation += 1;
  loading = false; // a page still on its way for another key will be dropped
  loadMore(true);
}

// A key is printable ASCII (what an HTTP header can carry).
const KEY_SHAPE = /^[\x21-\x7e]+$/;

function sentinelVisible() {
  const box = $("more").getBoundingClientRect();
  return box.top < window.innerHeight && box.bottom >= 0;
}

async function loadMore(first) {
  if (loading || (!first && !cursor)) return;
  loading = true;
  const mine = generation;
  const query = new URLSearchParams({ limit: "24" });
  if (cursor) query.set("cursor", cursor);
  try {
    const page = await api(`/api/images?${query}`);
    if (mine !== generation) return; // asked with the key before this one
    for (const image of page.images) $("grid").append(tile(image));
    cursor = page.nextCursor;
    $("status").textContent = $("grid").children.length ? "" : "No images yet: upload some above.";
  } catch (error) {
    if (mine !== generation) return;
    $("status").textContent = `Could not load the images: ${error.message}`;
    $("status").classList.add("error");
    return;
  } finally {
    if (mine === generation) loading = false;
  }
  // A tall window may show the end of the grid already: keep filling it.
  if (cursor && sentinelVisible()) loadMore(false);
}

function tile(image, atStart) {
  const item = document.createElement("li");
  item.dataset.id = image._id;
  const button = document.createElement("button");
  button.type = "button";
  button.setAttribute("aria-label", `Open ${image.filename}`);
  const img = document.createElement("img");
  img.src = image.thumbnailUrl;
  img.alt = image.filename;
  img.loading = "lazy";
  if (image.placeholder) button.style.background = image.placeholder;
  button.append(img);
  let shown = image;
  button.addEventListener("click", () => open(shown));
  renewWhenRefused(img, image._id, "thumbnailUrl", (fresh) => {
    shown = fresh;
  });
  item.append(button);
  if (atStart) $("grid").prepend(item);
  return item;
}

// Signed URLs expire (SIGNED_URL_TTL): a picture a tab left open asks for late is refused.
// Its metadata gives fresh URLs; an image deleted meanwhile leaves. A picture refused again
// (its address over the rate limit, the service restarting) is asked for again later, a
// few times, further apart each time (an <img> cannot read Retry-After).
const RETRY_AFTER_MS = [0, 5000, 20000, 60000];

function renewWhenRefused(img, id, field, renewed) {
  let failures = 0;
  img.addEventListener("error", () => {
    if (failures >= RETRY_AFTER_MS.length) return;
    setTimeout(async () => {
      if (!img.isConnected) return; // its tile or the detail has gone meanwhile
      try {
        const fresh = await api(`/api/images/${id}`);
        img.src = fresh[field];
        renewed(fresh);
      } catch (error) {
        if (error.status === 404) dropTile(id);
      }
    }, RETRY_AFTER_MS[failures++]);
  });
}

function upload(file) {
  const row = document.createElement("li");
  const name = document.createElement("span");
  name.textContent = file.name;
  const bar = document.createElement("progress");
  bar.max = 1;
  bar.value = 0;
  bar.setAttribute("aria-label", `Uploading ${file.name}`);
  row.append(name, bar);
  $("uploads").append(row);
  const form = new FormData();
  form.append("image", file, file.name);
  const mine = generation;
  const request = new XMLHttpRequest();
  request.open("POST", "/api/images/upload");
  for (const [header, value] of Object.entries(headers())) request.setRequestHeader(header, value);
  request.upload.addEventListener("progress", (event) => {
    if (event.lengthComputable) bar.value = event.loaded / event.total;
  });
  request.addEventListener("load", () => {
    if (mine !== generation) return; // sent with the key before this one: not this grid's
    let body = null;
    try {
      body = JSON.parse(request.responseText);
    } catch (error) {
      body = null;
    }
    if (request.status === 201) {
      bar.value = 1;
      row.remove();
      $("status").textContent = "";
      $("grid").prepend(tile(body.image));
      return;
    }
    if (request.status === 401) askForKey("That key was refused; enter another.");
    const error = document.createElement("p");
    error.className = "error";
    error.textContent = `${file.name} was refused: ${explain(request.status, body)}`;
    row.append(error);
    bar.remove();
  });
  request.addEventListener("error", () => {
    const error = document.createElement("p");
    error.className = "error";
    error.textContent = `${file.name}: the upload failed (network)`;
    row.append(error);
  });
  request.send(form);
}

// `fromGrid`: what the grid holds, whose URLs may have expired since (a tab left open).
function show(image, fromGrid = false) {
  current = image;
  $("detail").dataset.version = image.version;
  $("detail-title").textContent = image.filename;
  const picture = document.createElement("img"); // no listener left from another image
  picture.id = "detail-image";
  $("detail-image").replaceWith(picture);
  renewWhenRefused(picture, image._id, "imageUrl", (fresh) => {
    if (fresh.version !== current.version) {
      show(fresh); // replaced elsewhere: the detail follows the picture
      replaceTile(fresh);
      return;
    }
    current = fresh;
    $("detail-download").href = fresh.imageUrl;
  });
  // An expired URL would only be refused: the details' refresh brings a fresh one.
  if (!(fromGrid && expired(image.imageUrl))) picture.src = image.imageUrl;
  picture.alt = image.filename;
  $("detail-download").href = image.imageUrl;
  $("detail-download").setAttribute("download", image.filename);
  const meta = {
    Type: image.contentType,
    Size: `${image.width} × ${image.height} px, ${image.size} bytes`,
    Version: image.version,
    Uploaded: new Date(image.uploadedAt).toLocaleString(),
    Updated: new Date(image.updatedAt).toLocaleString(),
    SHA256: image.sha256,
  };
  $("detail-meta").replaceChildren(
    ...Object.entries(meta).flatMap(([term, value]) => {
      const dt = document.createElement("dt");
      dt.textContent = term;
      const dd = document.createElement("dd");
      dd.textContent = value;
      dd.dataset.field = term.toLowerCase();
      return [dt, dd];
    }),
  );
  $("detail-status").textContent = "";
}

function open(image) {
  show(image, true);
  $("detail").showModal();
  refreshDetail(image._id);
}

// Whether a signed URL's `expires` (Unix seconds) has passed by this machine's clock.
function expired(url) {
  const expires = new URL(url, window.location.href).searchParams.get("expires");
  return expires !== null && Number(expires) * 1000 <= Date.now();
}

// The version a write is meant for: If-Match makes it a 412 when another tab or client
// has changed the image since (the metadata ETag without its expiry, which writes ignore).
function versionTag(image) {
  return `"${image.sha256}.${image.version}"`;
}

// The grid may show an image older than it is now (replaced or deleted elsewhere): the
// detail shows it as it is, or leaves with it.
async function refreshDetail(id, message = "") {
  const shown = current;
  try {
    const fresh = await api(`/api/images/${id}`);
    if (!$("detail").open || current._id !== id) return;
    if (fresh.version !== current.version) {
      show(fresh);
      replaceTile(fresh);
    } else if (!$("detail-image").getAttribute("src")) {
      show(fresh); // the grid's URL had expired
    }
    $("detail-status").textContent = message;
  } catch (error) {
    if (error.status === 404) goneElsewhere(id, DELETED_ELSEWHERE(shown));
  }
}

// The image the detail shows is gone (deleted here, or elsewhere: `note` says so): the
// detail closes, and the keyboard goes on from the tile next to its own.
function goneElsewhere(id, note = "") {
  const item = document.querySelector(`#grid li[data-id="${id}"]`);
  const next = item?.nextElementSibling || item?.previousElementSibling;
  if ($("detail").open && current._id === id) $("detail").close();
  dropTile(id);
  if (note && $("grid").children.length) $("status").textContent = note;
  next?.querySelector("button")?.focus();
}

const DELETED_ELSEWHERE = (image) => `${image.filename} was deleted elsewhere.`;

function replaceTile(image) {
  const item = document.querySelector(`#grid li[data-id="${image._id}"]`);
  if (item) item.replaceWith(tile(image));
}

async function replace(file) {
  const form = new FormData();
  form.append("image", file, file.name);
  $("detail-status").textContent = "Replacing…";
  const shown = current;
  const id = shown._id;
  try {
    const body = await api(`/api/images/${id}`, {
      method: "PUT",
      body: form,
      headers: { "If-Match": versionTag(shown) },
    });
    replaceTile(body.image);
    show(body.image);
    $("detail-status").textContent = "Replaced.";
  } catch (error) {
    if (error.status === 412) {
      refreshDetail(id, CHANGED_ELSEWHERE("replaced", "replace"));
    } else if (error.status === 404) {
      goneElsewhere(id, DELETED_ELSEWHERE(shown));
    } else {
      $("detail-status").textContent = `Not replaced: ${error.message}`;
    }
  }
}

const CHANGED_ELSEWHERE = (done, action) =>
  `Not ${done}: it was changed elsewhere meanwhile. This is the current version; ` +
  `${action} it again if you still mean to.`;

async function remove() {
  if (!window.confirm(`Delete ${current.filename}? This cannot be undone.`)) return;
  const id = current._id;
  try {
    const ifMatch = { "If-Match": versionTag(current) };
    await api(`/api/images/${id}`, { method: "DELETE", headers: ifMatch });
  } catch (error) {
    if (error.status === 412) {
      refreshDetail(id, CHANGED_ELSEWHERE("deleted", "delete"));
      return;
    }
    // A 404: deleted meanwhile (another tab, another client), which is what was asked.
    if (error.status !== 404) {
      $("detail-status").textContent = `Not deleted: ${error.message}`;
      return;
    }
  }
  goneElsewhere(id);
}

// An image deleted here or elsewhere leaves the grid; the last one leaves it empty.
function dropTile(id) {
  document.querySelector(`#grid li[data-id="${id}"]`)?.remove();
  if (!$("grid").children.length) $("status").textContent = "No images yet: upload some above.";
}

document.addEventListener("DOMContentLoaded", () => {
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const value = $("key").value.trim();
    if (!KEY_SHAPE.test(value)) {
      $("key-status").textContent = "An API key is letters, digits and punctuation only.";
      $("key").focus();
      return;
    }
    sessionStorage.setItem(KEY, value);
    start();
  });
  $("change-key").addEventListener("click", () => {
    sessionStorage.removeItem(KEY);
    askForKey("");
  });
  $("files").addEventListener("change", () => {
    for (const file of $("files").files) upload(file);
    $("files").value = "";
  });
  const drop = $("drop");
  drop.addEventListener("dragover", (event) => {
    event.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    for (const file of event.dataTransfer.files) upload(file);
  });
  $("replace-file").addEventListener("change", () => {
    const file = $("replace-file").files[0];
    $("replace-file").value = "";
    if (file) replace(file);
  });
  $("detail-delete").addEventListener("click", remove);
  new IntersectionObserver((entries) => {
    if (entries.some((entry) => entry.isIntersecting)) loadMore(false);
  }).observe($("more"));
  // The page says whether keys are needed (without one, a first request would be refused:
  // a console error, and the address's budget spent). A stored key is tried: it may have
  // been revoked since.
  if (key() && !KEY_SHAPE.test(key())) sessionStorage.removeItem(KEY);
  if (document.body.dataset.auth === "on" && !key()) {
    askForKey("");
    return;
  }
  fetch("/api/images?limit=1", { headers: headers() })
    .then((response) => {
      if (response.status === 401) askForKey(key() ? "That key was refused; enter another." : "");
      else start();
    })
    .catch((error) => askForKey(`The service cannot be reached: ${error.message}`));
});
