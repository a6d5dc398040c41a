// ComfyUI-HyperSD front-end extension.
// - Advice from the server (e.g. a diffusers one-step UNet given to Load Checkpoint) shows as a
//   toast naming the node to use, instead of a cryptic error later in the graph.
// - The training nodes draw a live chart of their run (per-step loss, learning rate, stage
//   boundaries; step, stage and time left; at the end, where the LoRA files were saved), kept
//   by the server so that it comes back after a reload.
// - Hyper-SD Rate Images: after a run, a like and a dislike button for each picture and a
//   "prefer A over B" choice show on the node; each click goes to POST /hypersd/ratings with
//   what the graph used (prompt, seed, checkpoint, LoRAs, sampler), as the node reported it.
// - Opening a workflow with nodes of other Hyper-SD/TCD packs that are not installed
//   (TCDModelSamplingDiscrete, TCDScheduler, SamplerTCD, ...) offers to convert them to this
//   pack's nodes; the conversion itself is the server's (POST /hypersd/convert).
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

// The page's own words, in the page's language: locales/<lang>/main.json "hypersd" (served by
// the server as GET /i18n; scripts/build_locales.py makes the English from its MESSAGES).
let MESSAGES = {};
let messagesLocale = null;
let i18nCache = null;

function msg(key, vars = {}) {
  let t = MESSAGES[key] || key;
  for (const [k, v] of Object.entries(vars)) t = t.replace(`{${k}}`, v);
  return t;
}

async function loadMessages() {
  const loc = setting("Comfy.Locale", "en") || "en";
  if (loc === messagesLocale) return;
  messagesLocale = loc;
  try {
    if (!i18nCache) i18nCache = await (await api.fetchApi("/i18n")).json();
    MESSAGES = Object.assign({}, (i18nCache.en || {}).hypersd || {}, (i18nCache[loc] || {}).hypersd || {});
  } catch (e) {
    messagesLocale = null;  // try again later
  }
}

function toast(severity, summary, detail) {
  const t = app.extensionManager && app.extensionManager.toast;
  if (t && t.add) {
    t.add({ severity, summary, detail, life: 15000 });
  } else {
    console.warn(`${summary}: ${detail}`);
  }
}

// ---------------------------------------------------------------------- other packs' workflows

const FOREIGN_TYPES = ["TCDModelSamplingDiscrete", "TCDScheduler", "SamplerTCD", "SamplerTCD EulerA",
  "HyperSDXL1StepUnetScheduler"];
const CONVERT_SETTING = "HyperSD.ConvertOtherPacks";

function setting(id, fallback) {
  const s = app.extensionManager && app.extensionManager.setting;
  try {
    const v = s && s.get ? s.get(id) : undefined;
    return v === undefined || v === null ? fallback : v;
  } catch (e) {
    return fallback;
  }
}

// The other packs' node types in `graphData` (top level and subgraph definitions) that no
// installed pack provides.
function missingForeignTypes(graphData) {
  const registered = (window.LiteGraph && window.LiteGraph.registered_node_types) || {};
  const lists = [graphData && graphData.nodes];
  for (const sg of (graphData && graphData.definitions && graphData.definitions.subgraphs) || []) lists.push(sg.nodes);
  const found = new Set();
  for (const nodes of lists) {
    for (const n of Array.isArray(nodes) ? nodes : []) {
      if (n && FOREIGN_TYPES.includes(n.type) && !registered[n.type]) found.add(n.type);
    }
  }
  return [...found];
}

async function askToConvert(types) {
  const message = msg("convert_ask", { types: types.join(", ") });
  const dialog = app.extensionManager && app.extensionManager.dialog;
  if (dialog && dialog.confirm) {
    return (await dialog.confirm({ title: msg("convert_title"), message })) === true;
  }
  return window.confirm(message);
}

// Replace the contents of `graphData` with the server's conversion (in place: the front end
// goes on configuring the same object). Returns the server's sentences, or null.
async function convertInPlace(graphData) {
  const res = await api.fetchApi("/hypersd/convert", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(graphData),
  });
  const data = await res.json().catch(() => ({}));
  if (!res.ok) {
    toast("error", "Hyper-SD", data.error || `the conversion failed (the server answered ${res.status})`);
    return null;
  }
  for (const k of Object.keys(graphData)) delete graphData[k];
  Object.assign(graphData, data.workflow);
  return data.converted || [];
}

app.registerExtension({
  name: "HyperSD.Core",
  settings: [
    {
      id: CONVERT_SETTING,
      name: "Workflows with other Hyper-SD/TCD packs' nodes",
      category: ["Hyper-SD", "Workflows", "Convert"],
      type: "combo",
      options: ["ask", "convert", "leave"],
      defaultValue: "ask",
      tooltip: "When a workflow uses nodes of ComfyUI-TCD, comfyui-tcd-scheduler or the Hyper-SD release " +
        "(TCDModelSamplingDiscrete, TCDScheduler, SamplerTCD, HyperSDXL1StepUnetScheduler) and that pack is " +
        "not installed: ask before converting them to Hyper-SD's nodes, convert without asking, or leave them.",
    },
  ],
  async beforeConfigureGraph(graphData) {
    try {
      const types = missingForeignTypes(graphData);
      const mode = setting(CONVERT_SETTING, "ask");
      if (!types.length || mode === "leave") return;
      if (mode !== "convert" && !(await askToConvert(types))) return;
      const notes = await convertInPlace(graphData);
      if (notes) {
        window.__hypersd_last_conversion = notes;
        toast("success", msg("converted"), notes.join("\n"));
      }
    } catch (e) {
      toast("error", "Hyper-SD", `${msg("unconverted")} (${e.message || e})`);
    }
  },
  async init() {
    await loadMessages();  // before the nodes are registered (see beforeRegisterNodeDef)
  },
  // The host's front end (1.32.9) drops the packs' translations when it loads its own language
  // after them; where a node's name came through untranslated, this puts the pack's in (the
  // name, the description, the inputs' labels and tooltips, the outputs' tooltips).
  async beforeRegisterNodeDef(nodeType, nodeData) {
    const loc = messagesLocale;
    if (!loc || loc === "en" || !i18nCache) return;
    const tr = ((i18nCache[loc] || {}).nodeDefs || {})[nodeData.name];
    const en = ((i18nCache.en || {}).nodeDefs || {})[nodeData.name];
    if (!tr || !en || nodeData.display_name !== en.display_name) return;
    nodeData.display_name = nodeType.title = tr.display_name;
    if (tr.description) nodeData.description = tr.description;
    for (const section of ["required", "optional"]) {
      for (const [name, spec] of Object.entries((nodeData.input || {})[section] || {})) {
        const t = (tr.inputs || {})[name];
        if (!t || !Array.isArray(spec)) continue;
        if (!spec[1] || typeof spec[1] !== "object") spec[1] = {};
        if (t.tooltip) spec[1].tooltip = t.tooltip;
        if (t.name) spec[1].label = t.name;
      }
    }
    (nodeData.output_tooltips || []).forEach((_, i) => {
      const t = (tr.outputs || {})[String(i)];
      if (t && t.tooltip) nodeData.output_tooltips[i] = t.tooltip;
    });
  },
  // ... and the widgets' and input slots' labels, which that front end takes from its own store
  // only (the label in the input's options above does not reach them there).
  nodeCreated(node) {
    const loc = messagesLocale;
    if (!loc || loc === "en" || !i18nCache) return;
    const tr = ((i18nCache[loc] || {}).nodeDefs || {})[node.comfyClass];
    if (!tr) return;
    for (const item of [...(node.widgets || []), ...(node.inputs || [])]) {
      const t = (tr.inputs || {})[item.name];
      if (t && t.name && (!item.label || item.label === item.name)) item.label = t.name;
    }
    (node.outputs || []).forEach((out, i) => {
      const t = (tr.outputs || {})[String(i)];
      if (t && t.name && (!out.label || out.label === out.name)) out.label = t.name;
    });
  },
  async setup() {
    setInterval(loadMessages, 2000);  // the language can change while the page is open
    api.addEventListener("hypersd.advice", (e) => {
      const d = e.detail || {};
      toast("warn", "Hyper-SD", d.message || "check the node settings");
      window.__hypersd_last_advice = d;
    });
    window.__hypersd_loaded = true;
  },
});

// ---------------------------------------------------------------------- rating pictures

const RATE_NODE = "HyperSDRateImages";
const RATE_WIDGET = "hypersd_rating";

// POST one rating; {ok, error} with the server's sentence when it refuses.
async function sendRating(body) {
  try {
    const res = await api.fetchApi("/hypersd/ratings", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
    });
    const data = await res.json().catch(() => ({}));
    return res.ok ? { ok: true } : { ok: false, error: data.error || `the server answered ${res.status}` };
  } catch (e) {
    return { ok: false, error: `the server could not be reached (${e.message || e})` };
  }
}

function imageRef(im) {
  return { filename: im.filename, subfolder: im.subfolder || "", type: im.type || "output" };
}

// A widget of `node` that holds the element `box`: shown in the node, never a value of it
// (neither saved with the workflow nor queued).
function boxWidget(node, name, box, getMinHeight) {
  const w = node.addDOMWidget(name, name, box, { serialize: false, hideOnZoom: false, getMinHeight });
  w.serialize = false;
  return w;
}

function el(tag, props = {}, children = []) {
  const e = Object.assign(document.createElement(tag), props);
  e.append(...children);
  return e;
}

// A button that sends makeBody() on click and shows the outcome: a green tick, or red and
// a toast with the server's sentence. data-state (sending / saved / error) is kept for tests.
function rateButton(text, attrs, makeBody) {
  const b = el("button", { textContent: text, title: attrs.title || "" });
  b.style.cssText = "padding:1px 6px;font-size:11px;cursor:pointer";
  b.dataset.hypersdRate = attrs.kind;
  if (attrs.index !== undefined) b.dataset.index = String(attrs.index);
  b.addEventListener("click", async () => {
    b.disabled = true;
    b.dataset.state = "sending";
    const r = await sendRating(makeBody());
    b.disabled = false;
    b.dataset.state = r.ok ? "saved" : "error";
    b.textContent = r.ok ? `${text} \u2713` : `${text} \u2717`;
    b.style.background = r.ok ? "#2d5a2d" : "#7a2d2d";
    if (!r.ok) toast("error", msg("not_stored"), r.error);
    setTimeout(() => {
      b.textContent = text;
      b.style.background = "";
    }, 1500);
  });
  return b;
}

// The widget's contents for one run: a row per picture, then the "prefer" row.
function ratingControls(images, context) {
  const ctx = context || {};
  const body = (kind, image, sampler, other) => {
    const b = {
      kind, image: imageRef(image), prompt: ctx.prompt || "", seed: ctx.seed ?? null,
      checkpoint: ctx.checkpoint || "", loras: ctx.loras || [], sampler, source: "page",
    };
    if (other) b.other = imageRef(other);
    return b;
  };
  const rows = images.map((im, i) =>
    el("div", { style: "display:flex;gap:4px;align-items:center" }, [
      el("span", { textContent: `#${i}`, title: im.filename, style: "min-width:2.5em" }),
      rateButton(msg("like"), { kind: "like", index: i }, () =>
        body("like", im, { ...(ctx.sampler || {}), batch_index: i })),
      rateButton(msg("dislike"), { kind: "dislike", index: i }, () =>
        body("dislike", im, { ...(ctx.sampler || {}), batch_index: i })),
    ]));
  const pick = (which, start) => {
    const s = el("select", {}, images.map((_, i) => el("option", { value: String(i), textContent: `#${i}` })));
    s.dataset.hypersdSelect = which;
    s.value = String(Math.min(start, images.length - 1));
    return s;
  };
  const a = pick("a", 0);
  const b = pick("b", 1);
  const prefer = rateButton(msg("prefer"), { kind: "prefer", title: msg("prefer_tip") }, () => {
    const [ia, ib] = [Number(a.value), Number(b.value)];
    return body("prefer", images[ia], { ...(ctx.sampler || {}), batch_index: ia, other_batch_index: ib },
      images[ib]);
  });
  const preferRow = el("div", { style: "display:flex;gap:4px;align-items:center;margin-top:4px" },
    [el("span", { textContent: "A" }), a, el("span", { textContent: "B" }), b, prefer]);
  if (images.length < 2) preferRow.style.display = "none";
  return [...rows, preferRow];
}

app.registerExtension({
  name: "HyperSD.Ratings",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== RATE_NODE) return;
    const executed = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      const r = executed ? executed.apply(this, arguments) : undefined;
      const images = (message && message.images) || [];
      const context = message && message[RATE_WIDGET] && message[RATE_WIDGET][0];
      if (!images.length) return r;
      if (typeof this.addDOMWidget !== "function") {  // an older front end: no place for buttons
        if (!nodeType.hypersdWarned) console.warn("Hyper-SD: this ComfyUI front end cannot show rating buttons; " +
          "POST /hypersd/ratings still stores ratings");
        nodeType.hypersdWarned = true;
        return r;
      }
      // one widget per node: a re-run replaces its contents
      let widget = findWidget(this, RATE_WIDGET);
      if (!widget) {
        const box = el("div", { className: "hypersd-rating" });
        box.style.cssText = "display:flex;flex-direction:column;gap:2px;font-size:11px;overflow:auto";
        widget = boxWidget(this, RATE_WIDGET, box, () => 26 * box.childElementCount + 8);
      }
      widget.element.replaceChildren(...ratingControls(images, context));
      const min = this.computeSize();
      this.setSize([Math.max(this.size[0], min[0], 260), Math.max(this.size[1], min[1])]);
      this.setDirtyCanvas(true, true);
      return r;
    };
  },
});

// ---------------------------------------------------------------------- settings that follow the file
// A LoRA node (this pack's loader, core LoraLoader / LoraLoaderModelOnly) with a Hyper-SD file
// shows a badge (family, variant, recommended settings) and an "Apply" button that sets the
// recommendation on the samplers its model flows into; a sampler whose settings contradict
// the file shows a warning that says what to change. The rules and the values are the
// server's (POST /hypersd/check, hypersd_core/advice.py); the page only reads and writes
// widgets. The setting "Hyper-SD > Badges" turns all of it off.

const LORA_STRENGTH = { HyperSDLoraLoader: "strength", LoraLoader: "strength_model", LoraLoaderModelOnly: "strength_model" };
const BADGE_SETTING = "HyperSD.Badges";
const SAMPLER_NODES = ["KSampler", "KSamplerAdvanced", "SamplerCustom", "SamplerCustomAdvanced"];
const GUIDER_NODES = ["CFGGuider", "BasicGuider", "DualCFGGuider"];
const BADGE_WIDGET = "hypersd_badge";
const WARN_WIDGET = "hypersd_warning";

function graphNodes() {
  const g = app.graph;
  return (g && (g.nodes || g._nodes)) || [];
}

function getLink(id) {
  const links = app.graph && app.graph.links;
  if (id === null || id === undefined || !links) return null;
  if (typeof links.get === "function") return links.get(id) || null;
  return links[id] || null;
}

function findWidget(node, name) {
  return node && node.widgets ? node.widgets.find((w) => w.name === name) : undefined;
}

function widgetValue(node, name) {
  const w = findWidget(node, name);
  return w ? w.value : undefined;
}

function setWidget(node, name, value) {
  const w = findWidget(node, name);
  if (!w || value === undefined || value === null) return false;
  w.value = value;
  if (typeof w.callback === "function") w.callback(value, app.canvas, node);
  return true;
}

// The node feeding `node`'s input `name`, or null.
function upstream(node, name) {
  const input = (node.inputs || []).find((i) => i.name === name);
  const link = input ? getLink(input.link) : null;
  return link ? app.graph.getNodeById(link.origin_id) : null;
}

// The nodes fed by `node`'s outputs of `type`.
function downstream(node, type) {
  const out = [];
  for (const o of node.outputs || []) {
    if (o.type !== type) continue;
    for (const id of o.links || []) {
      const link = getLink(id);
      const t = link ? app.graph.getNodeById(link.target_id) : null;
      if (t) out.push(t);
    }
  }
  return out;
}

// The sampler nodes the LoRA node's model flows into (through other model patches and guiders).
function samplersOf(loraNode) {
  const found = [];
  const seen = new Set([loraNode.id]);
  const queue = [loraNode];
  while (queue.length && seen.size < 200) {
    const n = queue.shift();
    for (const t of [...downstream(n, "MODEL"), ...downstream(n, "GUIDER")]) {
      if (seen.has(t.id)) continue;
      seen.add(t.id);
      if (SAMPLER_NODES.includes(t.type)) found.push(t);
      else queue.push(t);
    }
  }
  return found;
}

// What a sampler node and the nodes feeding it set (null where the graph does not say).
function samplerSettings(node) {
  const s = { id: node.id };
  if (node.type === "KSampler" || node.type === "KSamplerAdvanced") {
    for (const k of ["steps", "cfg", "scheduler"]) s[k] = widgetValue(node, k) ?? null;
    s.sampler = widgetValue(node, "sampler_name") ?? null;
    return s;
  }
  if (node.type === "SamplerCustom") s.cfg = widgetValue(node, "cfg") ?? null;
  const guider = node.type === "SamplerCustomAdvanced" ? upstream(node, "guider") : null;
  if (guider) s.cfg = guider.type === "BasicGuider" ? 1 : widgetValue(guider, "cfg") ?? null;
  const sampler = upstream(node, "sampler");
  if (sampler && sampler.type === "HyperSDTCDSampler") Object.assign(s, { sampler: "tcd", eta: widgetValue(sampler, "eta") });
  else if (sampler && sampler.type === "KSamplerSelect") s.sampler = widgetValue(sampler, "sampler_name") ?? null;
  const sigmas = upstream(node, "sigmas");
  if (sigmas && sigmas.type === "HyperSDScheduler") {
    Object.assign(s, { steps: widgetValue(sigmas, "steps"), scheduler: `hypersd_${widgetValue(sigmas, "mode")}` });
  } else if (sigmas && sigmas.type === "HyperSDOneStepScheduler") {
    Object.assign(s, { steps: 1, scheduler: "hypersd_one_step" });
  } else if (sigmas && sigmas.type === "BasicScheduler") {
    Object.assign(s, { steps: widgetValue(sigmas, "steps"), scheduler: widgetValue(sigmas, "scheduler") });
  }
  return s;
}

// Set the recommendation `v` (the server's "apply") on a sampler node and the nodes feeding it.
function applyToSampler(node, v) {
  if (node.type === "KSampler" || node.type === "KSamplerAdvanced") {
    for (const [k, val] of [["steps", v.steps], ["cfg", v.cfg], ["sampler_name", v.sampler_name], ["scheduler", v.scheduler]]) {
      setWidget(node, k, val);
    }
  }
  if (node.type === "SamplerCustom") setWidget(node, "cfg", v.cfg);
  const guider = node.type === "SamplerCustomAdvanced" ? upstream(node, "guider") : null;
  if (guider && guider.type !== "BasicGuider") setWidget(guider, "cfg", v.cfg);
  const sampler = upstream(node, "sampler");
  if (sampler && sampler.type === "HyperSDTCDSampler") setWidget(sampler, "eta", v.eta);
  else if (sampler && sampler.type === "KSamplerSelect") setWidget(sampler, "sampler_name", v.sampler_name);
  const sigmas = upstream(node, "sigmas");
  if (sigmas && sigmas.type === "HyperSDScheduler") {
    setWidget(sigmas, "steps", v.steps);
    setWidget(sigmas, "mode", v.mode);
  } else if (sigmas && sigmas.type === "BasicScheduler") {
    setWidget(sigmas, "steps", v.steps);
    setWidget(sigmas, "scheduler", v.scheduler);
  }
}

// A text box widget on `node` (created once; hidden while empty).
function infoWidget(node, name, color) {
  const w = findWidget(node, name);
  if (w || typeof node.addDOMWidget !== "function") return w;
  const box = el("div", {});
  box.style.cssText = `font-size:11px;line-height:1.35;color:${color};padding:2px 4px;white-space:normal;overflow:hidden`;
  return boxWidget(node, name, box, () => (box.style.display === "none" ? 0 : box.hypersdHeight || 20));
}

// Show `children` (lines of text, buttons) in the box widget `w` of `node`, the node sized to
// hold them (the height is estimated from the text: the box is not laid out yet).
function showBox(node, w, children) {
  if (!w) return;
  const empty = !children.length;
  const width = Math.max(node.size[0], empty ? 0 : 320);
  const perLine = Math.max(20, Math.floor((width - 24) / 5.6));
  let height = 6;
  for (const c of children) {
    height += c.tagName === "BUTTON" ? 24 : 15 * Math.max(1, Math.ceil((c.textContent || "").length / perLine));
  }
  w.element.replaceChildren(...children);
  w.element.style.display = empty ? "none" : "";
  w.element.hypersdHeight = empty ? 0 : height;
  const min = node.computeSize([width, node.size[1]]);
  node.setSize([Math.max(width, min[0]), empty ? min[1] : Math.max(node.size[1], min[1])]);
  node.setDirtyCanvas(true, true);
}

function renderWarnings(sampler) {
  const all = Object.values(sampler.hypersdWarnings || {}).flat();
  const w = all.length ? infoWidget(sampler, WARN_WIDGET, "#f0b860") : findWidget(sampler, WARN_WIDGET);
  if (!w) return;
  w.element.dataset.hypersdWarning = all.join(" | ");
  showBox(sampler, w, all.map((t) => el("div", { textContent: `\u26a0 ${msg("warning")}: ${t}` })));
}

function clearFrom(loraNode) {
  for (const id of loraNode.hypersdSamplers || []) {
    const s = app.graph.getNodeById(id);
    if (s && s.hypersdWarnings) {
      delete s.hypersdWarnings[loraNode.id];
      renderWarnings(s);
    }
  }
  loraNode.hypersdSamplers = [];
}

function renderBadge(loraNode, data, samplers) {
  const w = data && data.hypersd ? infoWidget(loraNode, BADGE_WIDGET, "#9cc8ff") : findWidget(loraNode, BADGE_WIDGET);
  if (!w) return;
  if (!data || !data.hypersd) {
    w.element.dataset.hypersdBadge = "";
    showBox(loraNode, w, []);
    return;
  }
  w.element.dataset.hypersdBadge = data.badge;
  const apply = el("button", { textContent: msg(samplers.length ? "apply" : "apply_none") });
  apply.style.cssText = "padding:1px 6px;font-size:11px;cursor:pointer;margin-top:2px";
  apply.dataset.hypersdApply = "1";
  apply.disabled = !samplers.length;
  apply.addEventListener("click", () => {
    const v = data.apply;
    for (const s of samplers) applyToSampler(s, v);
    if (loraNode.type === "HyperSDLoraLoader") setWidget(loraNode, "strength", -1);  // automatic: the family's
    else setWidget(loraNode, LORA_STRENGTH[loraNode.type], v.strength);
    loraNode.hypersdSig = null;  // check again now
    app.graph.setDirtyCanvas(true, true);
    toast("success", "Hyper-SD", `${msg("applied")} ${samplers.map((s) => s.title || s.type).join(", ")}: ` +
      `${v.steps} steps, cfg ${v.cfg}, ${v.sampler_name} / ${v.scheduler}`);
  });
  const lines = [el("div", { textContent: data.badge })];
  for (const t of data.strength_warnings || []) lines.push(el("div", { textContent: `\u26a0 ${t}`, style: "color:#f0b860" }));
  lines.push(apply);
  showBox(loraNode, w, lines);
}

async function checkLoraNode(node, enabled) {
  const name = widgetValue(node, "lora_name");
  const samplers = enabled ? samplersOf(node) : [];
  const body = { lora: name, strength: widgetValue(node, LORA_STRENGTH[node.type]) ?? null,
    samplers: samplers.map(samplerSettings) };
  const sig = enabled ? JSON.stringify(body) : "off";
  if (sig === node.hypersdSig || node.hypersdBusy) return;
  node.hypersdSig = sig;
  clearFrom(node);
  if (!enabled || !name) {
    renderBadge(node, null, []);
    return;
  }
  node.hypersdBusy = true;
  try {
    const res = await api.fetchApi("/hypersd/check", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
    });
    const data = await res.json().catch(() => ({}));
    renderBadge(node, res.ok ? data : null, samplers);
    if (!res.ok || !data.hypersd) return;
    node.hypersdSamplers = samplers.map((s) => s.id);
    for (const s of samplers) {
      s.hypersdWarnings = s.hypersdWarnings || {};
      s.hypersdWarnings[node.id] = (data.warnings || {})[String(s.id)] || [];
      renderWarnings(s);
    }
  } catch (e) {
    node.hypersdSig = null;  // try again on the next round
  } finally {
    node.hypersdBusy = false;
  }
}

function checkAll() {
  const enabled = setting(BADGE_SETTING, true) !== false;
  for (const node of graphNodes()) {
    if (LORA_STRENGTH[node.type]) checkLoraNode(node, enabled);
  }
}

app.registerExtension({
  name: "HyperSD.Badges",
  settings: [
    {
      id: BADGE_SETTING,
      name: "Badges and warnings for Hyper-SD files",
      category: ["Hyper-SD", "Badges", "Show"],
      type: "boolean",
      defaultValue: true,
      tooltip: "On LoRA loaders with a Hyper-SD file: a badge with the file's recommended settings and an " +
        "Apply button; on the samplers they feed: a warning when a setting contradicts the file.",
    },
  ],
  async setup() {
    setInterval(checkAll, 1000);
  },
});

// ---------------------------------------------------------------------- training you can watch
// Hyper-SD Train TSCD LoRA and Hyper-SD Train Feedback LoRA draw their run inside the node: the
// loss of every step (log scale when it spans more than a decade), the learning rate (dashed,
// its own scale), a line where each stage begins; above it step, stage, loss and time left;
// at the end where the files were saved. The server keeps each node's run
// (GET /hypersd/train/runs/{node}), so the chart comes back after a page reload.

const TRAIN_NODES = ["HyperSDTrainTSCD", "HyperSDTrainFeedback"];
const CHART_WIDGET = "hypersd_chart";
const CHART_HEIGHT = 120;

function duration(s) {
  if (s === null || s === undefined || !isFinite(s)) return "";
  s = Math.max(0, Math.round(s));
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  return h ? `${h}h ${m}m` : m ? `${m}m ${s % 60}s` : `${s}s`;
}

function chartWidget(node) {
  let w = findWidget(node, CHART_WIDGET);
  if (w || typeof node.addDOMWidget !== "function") return w;
  const head = el("div", {});
  const canvas = el("canvas", {});
  canvas.style.cssText = `width:100%;height:${CHART_HEIGHT}px;display:block;background:#1b1b1b;border-radius:3px`;
  const foot = el("div", {});
  const box = el("div", {}, [head, canvas, foot]);
  box.style.cssText = "font-size:11px;line-height:1.35;color:#ccc;padding:2px 4px;overflow:hidden";
  box.dataset.hypersdChart = "0";
  w = boxWidget(node, CHART_WIDGET, box, () => CHART_HEIGHT + 40 + 16 * foot.childElementCount);
  w.parts = { head, canvas, foot, box };
  return w;
}

function drawChart(node) {
  const w = chartWidget(node);
  const d = node.hypersdRun;
  if (!w || !d) return;
  const { head, canvas, foot, box } = w.parts;
  const pts = d.points.filter((p) => p[1] !== null && p[1] !== undefined);
  const last = d.points[d.points.length - 1];
  const stage = (d.stages || []).filter((s) => s[0] <= d.step).pop();
  const loss = last && typeof last[1] === "number" ? last[1].toPrecision(3) : "?";
  const lr = last && typeof last[2] === "number" ? last[2].toExponential(1) : "";
  const when = d.status === "running" ? `${duration(d.eta_s)} ${msg("left")}`
    : d.status === "done" ? `${msg("done_in")} ${duration(d.elapsed_s)}`
    : d.status === "cancelled" ? msg("cancelled") : `${msg("failed")}: ${d.message}`;
  head.textContent = `${msg("step")} ${d.step}/${d.total} · ${stage ? stage[1] : ""} · ${msg("loss")} ${loss}` +
    (lr ? ` · lr ${lr}` : "") + ` · ${when}`;
  head.style.color = d.status === "failed" ? "#f08080" : "#ccc";
  foot.replaceChildren(...(d.files || []).map((f, i) =>
    el("div", { textContent: `${msg(i ? "stage_file" : "saved")}: ${f}`, title: f, style: "white-space:nowrap;overflow:hidden;text-overflow:ellipsis" })));
  Object.assign(box.dataset, { hypersdChart: String(d.points.length), hypersdStatus: d.status,
    hypersdStages: String((d.stages || []).length), hypersdFiles: (d.files || []).join("|") });

  const dpr = window.devicePixelRatio || 1;
  const W = Math.max(100, canvas.clientWidth || node.size[0] - 16);
  const H = CHART_HEIGHT;
  canvas.width = W * dpr;
  canvas.height = H * dpr;
  const ctx = canvas.getContext("2d");
  ctx.scale(dpr, dpr);
  ctx.clearRect(0, 0, W, H);
  const x0 = d.start || 0;
  const X = (step) => 4 + ((step - x0) / Math.max(1, d.total - x0)) * (W - 8);
  ctx.font = "9px sans-serif";
  for (const [step, name] of d.stages || []) {  // stage boundaries
    ctx.strokeStyle = "#555";
    ctx.beginPath();
    ctx.moveTo(X(step), 0);
    ctx.lineTo(X(step), H);
    ctx.stroke();
    ctx.fillStyle = "#888";
    ctx.fillText(name, X(step) + 2, 10);
  }
  const line = (values, color, dash, logScale) => {
    const v = values.filter((p) => typeof p[1] === "number" && (!logScale || p[1] > 0));
    if (!v.length) return;
    const f = (y) => (logScale ? Math.log10(y) : y);
    let lo = Math.min(...v.map((p) => f(p[1])));
    let hi = Math.max(...v.map((p) => f(p[1])));
    if (hi - lo < 1e-12) { lo -= 0.5; hi += 0.5; }
    const Y = (y) => H - 4 - ((f(y) - lo) / (hi - lo)) * (H - 18);
    ctx.strokeStyle = color;
    ctx.setLineDash(dash);
    ctx.beginPath();
    v.forEach((p, i) => (i ? ctx.lineTo(X(p[0]), Y(p[1])) : ctx.moveTo(X(p[0]), Y(p[1]))));
    ctx.stroke();
    ctx.setLineDash([]);
  };
  const losses = pts.map((p) => [p[0], p[1]]).filter((p) => p[1] > 0);
  const span = losses.length ? Math.max(...losses.map((p) => p[1])) / Math.min(...losses.map((p) => p[1])) : 1;
  line(d.points.map((p) => [p[0], p[2]]), "#7a7ad0", [3, 3], false);
  line(pts.map((p) => [p[0], p[1]]), "#8fd18f", [], span > 10);
  const min = node.computeSize();
  if (node.size[1] < min[1] || node.size[0] < 300) node.setSize([Math.max(node.size[0], 300), Math.max(node.size[1], min[1])]);
  node.setDirtyCanvas(true, true);
}

// Merge a run (a progress message, or the server's whole run) into the node's chart data.
function mergeRun(node, run) {
  let d = node.hypersdRun;
  if (!d || d.started !== run.started) d = node.hypersdRun = { points: [], stride: 1 };
  const lastStep = d.points.length ? d.points[d.points.length - 1][0] : -1;
  for (const p of run.points || []) if (p[0] > lastStep) d.points.push(p);
  if ((run.stride || 1) > d.stride) d.points = d.points.filter((p) => p[0] % run.stride === 0);
  Object.assign(d, { ...run, points: d.points, stride: run.stride || 1 });
  drawChart(node);
}

async function restoreCharts() {
  for (const node of graphNodes()) {
    if (!TRAIN_NODES.includes(node.type) || node.hypersdAsked) continue;
    node.hypersdAsked = true;
    try {
      const res = await api.fetchApi(`/hypersd/train/runs/${encodeURIComponent(node.id)}`);
      if (res.ok) {
        const run = await res.json();
        if (run.label && node.type === (run.label === "HyperSD feedback" ? "HyperSDTrainFeedback" : "HyperSDTrainTSCD")) {
          mergeRun(node, run);
        }
      }
    } catch (e) {
      node.hypersdAsked = false;  // ask again on the next round
    }
  }
}

app.registerExtension({
  name: "HyperSD.TrainingChart",
  async setup() {
    api.addEventListener("hypersd.train.progress", (e) => {
      const d = e.detail || {};
      const node = app.graph && app.graph.getNodeById(Number(d.node));
      if (node && TRAIN_NODES.includes(node.type)) {
        node.hypersdAsked = true;
        mergeRun(node, d);
      }
    });
    setInterval(restoreCharts, 1000);
  },
});
