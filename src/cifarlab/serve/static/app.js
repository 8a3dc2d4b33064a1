// cifarlab page: choose, drop or paste an image; POST it to /v1/predict; draw the top-5 bars.
// Recent predictions are this tab's own (sessionStorage): the server shows nobody's uploads.
"use strict";
const $ = (id) => document.getElementById(id);
const UNSURE_BELOW = 0.5;  // top probability under this: say the model is not sure
const recent = JSON.parse(sessionStorage.getItem("cifarlab-recent") || "[]");

function pct(p) { return (p * 100).toFixed(1) + "%"; }

async function loadModel() {
  try {
    const r = await fetch("/v1/model");
    const m = await r.json();
    if (!r.ok) throw new Error(m.error || r.statusText);
    // the accuracy shown is the one measured with the TTA that is serving, or none
    const acc = m.test_accuracy != null ? `test accuracy ${pct(m.test_accuracy)} (TTA ${m.tta})`
      : m.test_accuracy_tta !== m.tta
        ? `test accuracy not measured at TTA ${m.tta} (the run's is TTA ${m.test_accuracy_tta})`
        : "test accuracy n/a";
    $("model").textContent = `${m.name} (${m.model}, version ${m.version}) · ${acc}`;
    $("classes").textContent = m.classes.join(", ");
    drawRecent();
  } catch (e) {
    $("model").textContent = "model not ready: " + e.message + " (retrying)";
    setTimeout(loadModel, 1000);
  }
}

function remember(name, top) {
  recent.unshift({ name, top });
  recent.length = Math.min(recent.length, 8);
  sessionStorage.setItem("cifarlab-recent", JSON.stringify(recent));
  drawRecent();
}

function drawRecent() {
  const ul = $("recent");
  ul.replaceChildren(...recent.map((r) => {
    const li = document.createElement("li");
    li.textContent = `${r.name}: ${r.top.class} (${pct(r.top.probability)})`;
    return li;
  }));
}

function showBars(top) {
  $("bars").replaceChildren(...top.map((t) => {
    const li = document.createElement("li");
    li.className = "pred";
    const name = document.createElement("span");
    name.className = "cls";
    name.textContent = t.class;
    const bar = document.createElement("span");
    bar.className = "bar";
    const fill = document.createElement("span");
    fill.style.width = pct(t.probability);
    bar.append(fill);
    const p = document.createElement("span");
    p.className = "p";
    p.textContent = pct(t.probability);
    li.dataset.probability = t.probability;  // the exact value the API answered
    li.append(name, bar, p);
    return li;
  }));
}

function setStatus(text, isError) {
  const st = $("status");
  st.textContent = text;
  st.className = isError ? "error" : "muted";
  st.setAttribute("role", isError ? "alert" : "status");
}

function showUnsure(top) {
  const el = $("unsure");
  if (top[0].probability >= UNSURE_BELOW) { el.hidden = true; return; }
  const alt = top.length > 1 ? ` It could also be ${top[1].class} (${pct(top[1].probability)}).` : "";
  el.textContent = `Not sure: the best guess has only ${pct(top[0].probability)}.${alt}`;
  el.hidden = false;
}

async function classify(file) {
  if (!file) return;
  const preview = $("preview");
  preview.src = URL.createObjectURL(file);
  preview.hidden = false;
  $("unsure").hidden = true;
  setStatus("Classifying " + (file.name || "pasted image") + "…", false);
  const form = new FormData();
  form.append("file", file, file.name || "pasted.png");
  try {
    const r = await fetch("/v1/predict", { method: "POST", body: form });  // top 5 (or all)
    const body = await r.json();
    if (!r.ok) throw new Error(body.error || r.statusText);
    const pred = body.predictions[0];
    setStatus(`${pred.top[0].class} · ${body.timing.total_ms.toFixed(1)} ms` +
      (pred.cached ? " (cached)" : ""), false);
    showUnsure(pred.top);
    $("status").dataset.top = pred.top[0].class;
    $("bars").dataset.top = JSON.stringify(pred.top);
    showBars(pred.top);
    remember(pred.filename, pred.top[0]);
  } catch (e) {
    setStatus("Error: " + e.message, true);
    $("bars").replaceChildren();
    delete $("bars").dataset.top;
  }
}

const drop = $("drop");
// keyboard: Enter or Space on the drop zone opens the file chooser too
drop.addEventListener("keydown", (e) => {
  if ((e.key === "Enter" || e.key === " ") && e.target === drop) { e.preventDefault(); $("file").click(); }
});
$("file").addEventListener("change", (e) => classify(e.target.files[0]));
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  classify(e.dataTransfer.files[0]);
});
document.addEventListener("paste", (e) => {
  const item = [...e.clipboardData.items].find((i) => i.type.startsWith("image/"));
  if (item) classify(item.getAsFile());
});
loadModel();
