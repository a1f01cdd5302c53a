"use strict";
// The labeling page, keyboard only. The server decides which image comes next (least sure
// first, none that another tab holds) and sends its neighbours, which this script preloads,
// so that the next image is on screen as soon as the server has saved the label. Labels are
// checked as they are typed by the rules of captcha_lit/labeling/rules.py, mirrored here.

const $ = (id) => document.getElementById(id);
const text = $("text");
const doneNote = $("done");  // kept: the stage drops it while an image shows
const client = crypto.randomUUID ? crypto.randomUUID() : `${Date.now()}-${Math.random()}`;  // one per tab
const items = new Map();     // index -> item, as the server last sent it
const preloaded = new Map(); // url -> decoded <img>, the strip's images ahead of time
const timings = [];          // ms from a key press to the next image on screen
let rules = null;
let current = null, lastShown = null, busy = false;
window.captchaLabel = { timings, client };

// ---- the label rules (rules.py) ------------------------------------------------------------
function swapCase(c) {
  return c === c.toUpperCase() ? c.toLowerCase() : c.toUpperCase();
}

function fitCase(value) {
  if (!rules || rules.charset === null) return value;
  return Array.from(value, (c) => {
    const other = swapCase(c);
    return !rules.charset.includes(c) && other.length === 1 && rules.charset.includes(other) ? other : c;
  }).join("");
}

function charProblem(value) {
  for (const c of value) {
    if (/\s/.test(c)) return "a label has no spaces";
    if (rules.charset !== null && !rules.charset.includes(c)) {
      return `'${c}' is not in the charset '${rules.charset_name}' (${rules.source})`;
    }
  }
  return null;
}

function problem(value) {
  if (!value) return "the label is empty: type what the image says, or skip it (Tab)";
  const bad = charProblem(value);
  if (bad) return bad;
  if (rules.min_length !== null && value.length < rules.min_length) {
    return `${value.length} characters: a label here has at least ${rules.min_length} (${rules.source})`;
  }
  if (rules.max_length !== null && value.length > rules.max_length) {
    return `${value.length} characters: a label here has at most ${rules.max_length} (${rules.source})`;
  }
  return null;
}

function say(message, hint = false) {
  $("problem").textContent = message || "";
  $("problem").classList.toggle("hint", hint);
}

// While typing, a bad character is an error at once; a short label is only a hint until Enter.
function check() {
  const bad = text.value ? charProblem(text.value) : null;
  text.classList.toggle("invalid", bad !== null);
  if (bad) say(bad);
  else if (rules && rules.max_length !== null && text.value) {
    const range = rules.min_length === rules.max_length ? rules.max_length : `${rules.min_length ?? 1}-${rules.max_length}`;
    say(`${text.value.length} of ${range} characters`, true);
  } else say("");
  renderChars();
}

// ---- showing an image --------------------------------------------------------------------
function imageFor(url) {
  let img = preloaded.get(url);
  if (!img) {
    img = new Image();
    img.src = url;
    img.decode().catch(() => {});
    preloaded.set(url, img);
    if (preloaded.size > 64) preloaded.delete(preloaded.keys().next().value);
  }
  img.alt = "the CAPTCHA to label";
  return img;
}

function show(view, started) {
  for (const item of view.items) items.set(item.index, item);
  current = view.current;
  renderCounts(view.counts);
  if (current === null) {
    $("stage").replaceChildren(doneNote);
    doneNote.style.display = "block";
    $("where").textContent = "";
    text.value = "";
    $("chars").replaceChildren();
  } else {
    const item = items.get(current);
    $("stage").replaceChildren(imageFor(item.url));
    lastShown = current;
    const confidence = item.confidence === null ? "" : ` · model confidence ${item.confidence.toFixed(3)}`;
    $("where").textContent = `${item.index + 1} of ${view.counts.total} · ${item.path}${confidence}`
      + (item.error ? ` · ${item.error}` : "") + (item.label !== null ? " · labeled" : "")
      + (item.state === "skipped" || item.state === "unreadable" ? ` · ${item.state}` : "");
    text.value = item.label !== null ? item.label : fitCase(item.reading || "");
    text.select();
  }
  renderStrip(view.items);
  check();
  for (const item of view.items) imageFor(item.url);
  if (started !== undefined) {
    // after the frame that paints the new image
    requestAnimationFrame(() => setTimeout(() => {
      const ms = performance.now() - started;
      timings.push(ms);
      $("latency").textContent = ` · next image in ${ms.toFixed(0)} ms`;
    }, 0));
  }
}

function renderStrip(view) {
  $("strip").replaceChildren(...view.map((item) => {
    const figure = document.createElement("figure");
    const kind = item.state.startsWith("labeled:") ? "labeled" : item.state;
    figure.className = kind + (item.index === current ? " current" : "");
    figure.dataset.index = item.index;
    const img = document.createElement("img");
    img.src = item.url;
    img.alt = item.path;
    const caption = document.createElement("figcaption");
    caption.textContent = item.label !== null ? item.label : kind === "pending" ? "·" : kind;
    figure.append(img, caption);
    return figure;
  }));
}

// The model's reading, one cell per character with its confidence; cells the typed label changes are outlined.
function renderChars() {
  const item = current === null ? null : items.get(current);
  if (!item || item.reading === null) {
    $("chars").replaceChildren();
    return;
  }
  $("chars").replaceChildren(...Array.from(item.reading, (c, i) => {
    const p = item.char_confidences[i];
    const cell = document.createElement("span");
    cell.className = "char" + (text.value[i] !== c ? " changed" : "");
    cell.style.background = `hsl(${Math.round(120 * p)} 65% 45% / .35)`;
    cell.title = `the model reads '${c}' with confidence ${p.toFixed(3)}`;
    const glyph = document.createElement("b");
    glyph.textContent = c;
    cell.append(glyph, p.toFixed(2));
    return cell;
  }));
}

function renderCounts(c) {
  const parts = [["labeled", c.labeled], ["skipped", c.skipped], ["unreadable", c.unreadable],
                 ["remaining", `${c.remaining} of ${c.total}`]];
  if (c.compared > 0) {
    parts.push(["model reading kept", `${c.accepted} of ${c.compared} (${(100 * c.accepted / c.compared).toFixed(0)}%)`]);
  }
  $("counts").replaceChildren(...parts.map(([name, value]) => {
    const span = document.createElement("span");
    span.id = `count-${name.split(" ")[0]}`;
    const b = document.createElement("b");
    b.textContent = value;
    span.append(`${name} `, b);
    return span;
  }));
}

// ---- talking to the server ---------------------------------------------------------------
async function call(url, options, started) {
  busy = true;
  try {
    const response = await fetch(url, options);
    const body = await response.json();
    if (response.ok) {
      show(body, started);
    } else if (response.status === 409) {
      items.set(body.item.index, body.item);  // its new state: the same key again replaces it
      say(`${body.detail}; press the key again to replace it`);
    } else {
      say(typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail));
    }
  } catch (error) {
    say("the server does not answer: nothing was saved, and the label is still in the box");
  } finally {
    busy = false;
  }
}

function decide(action, started) {
  if (busy || current === null) return;
  const item = items.get(current);
  const label = action === "save" ? text.value : "";
  call("/api/label", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ client, index: current, action, label, base: item.state }),
  }, started);
}

function go(index) {
  if (busy) return;
  const at = index === undefined ? "" : `&index=${index}`;
  call(`/api/state?client=${encodeURIComponent(client)}${at}`, {}, undefined);
}

text.addEventListener("input", () => {
  const fitted = fitCase(text.value);
  if (fitted !== text.value) {
    const caret = text.selectionStart;
    text.value = fitted;
    text.setSelectionRange(caret, caret);
  }
  check();
});

text.addEventListener("keydown", (event) => {
  const started = performance.now();
  if (event.key === "Enter") {
    event.preventDefault();
    if (event.ctrlKey || event.metaKey) return decide("unreadable", started);
    const bad = problem(text.value);
    if (bad) {
      text.classList.add("invalid");
      return say(bad);
    }
    decide("save", started);
  } else if (event.key === "Tab") {
    event.preventDefault();
    if (event.shiftKey) {
      const from = current === null ? lastShown + 1 : current;
      if (from > 0) go(from - 1);
    } else decide("skip", started);
  } else if (event.key === "Escape") {
    event.preventDefault();
    const item = current === null ? null : items.get(current);
    text.value = item ? fitCase(item.reading || "") : "";
    text.select();
    check();
  }
});

text.addEventListener("blur", () => setTimeout(() => text.focus(), 0));  // every key goes to the label

async function start() {
  const info = await (await fetch("/api/session")).json();
  rules = info.rules;
  $("folder").textContent = info.folder;
  $("model").textContent = info.model ? `model ${info.model.id}: least sure first` : "no model: file order";
  $("train").textContent = info.train_command;
  $("relabel").textContent = info.relabel_command;
  go();
  text.focus();
}

start().catch(() => say("the server does not answer: reload the page once it runs again"));
