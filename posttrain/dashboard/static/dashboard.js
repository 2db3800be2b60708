// posttrain dashboard: refreshes the jobs table, draws a job's live loss curves, checkpoints and log,
// and streams the job page's Try it chats.
// No framework and no build step. Every text that comes from the server is set with textContent.
"use strict";

const TERMINAL = new Set(["completed", "failed", "cancelled"]);
const PAUSABLE = new Set(["scheduled", "in_progress"]);
const SVG_NS = "http://www.w3.org/2000/svg";

function el(tag, attrs, text) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, value);
  if (text !== undefined && text !== null) node.textContent = String(text);
  return node;
}

function svg(tag, attrs, text) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, value);
  if (text !== undefined) node.textContent = String(text);
  return node;
}

// The page's CSRF token: every state-changing call sends it back (the gate refuses one without it).
function csrfToken() {
  const meta = document.querySelector('meta[name="csrf-token"]');
  return meta ? meta.content : "";
}

function fmt(x, digits = 4) {
  return x === null || x === undefined || Number.isNaN(Number(x)) ? "–" : Number(x).toFixed(digits);
}

function age(iso) {
  if (!iso) return "–";
  const s = Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
  if (s < 60) return `${Math.round(s)} s ago`;
  if (s < 3600) return `${Math.round(s / 60)} min ago`;
  if (s < 86400) return `${Math.round(s / 3600)} h ago`;
  return `${Math.round(s / 86400)} d ago`;
}

function localTime(iso) {
  return iso ? new Date(iso).toLocaleString() : "–";
}

function showTimes(root) {
  for (const node of root.querySelectorAll(".age[data-time]")) node.textContent = age(node.dataset.time);
  for (const node of root.querySelectorAll(".time[data-time]")) {
    if (node.dataset.time) node.textContent = localTime(node.dataset.time);
  }
}

async function getJSON(url) {
  const response = await fetch(url, { headers: { Accept: "application/json" }, cache: "no-store" });
  if (!response.ok) throw new Error(`${response.status} ${response.statusText}`);
  return response.json();
}

// -- the jobs table -----------------------------------------------------------------------------

function jobRow(job) {
  const row = el("tr", { "data-job-uuid": job.job_uuid });
  const link = el("a", { href: `/ui/jobs/${encodeURIComponent(job.job_uuid)}` }, job.job_uuid);
  row.append(el("td"));
  row.lastChild.append(link);

  const status = el("td");
  status.append(el("span", { class: `status ${job.status}` }, job.status));
  if (job.error && job.error.message) status.append(el("div", { class: "error" }, job.error.message));
  row.append(status);

  const model = job.model || "";
  row.append(el("td", { title: model }, model.replace(/\/+$/, "").split("/").pop()));
  row.append(el("td", {}, job.method));

  const progress = el("td");
  if (job.total_steps) {
    const bar = el("span", { class: "bar" });
    const fill = el("span");
    fill.style.width = `${Math.min(100, (100 * (job.step || 0)) / job.total_steps)}%`;
    bar.append(fill);
    progress.append(bar, document.createTextNode(`${job.step || 0} / ${job.total_steps}`));
  } else {
    progress.textContent = "–";
  }
  row.append(progress);
  row.append(el("td", {}, fmt(job.loss))); // the last step's loss
  row.append(el("td", { class: "age", "data-time": job.scheduled_at }, age(job.scheduled_at)));
  return row;
}

function startJobsPage() {
  const body = document.querySelector("#jobs tbody");
  const empty = document.getElementById("no-jobs");
  const refreshed = document.getElementById("refreshed");
  showTimes(document);
  async function refresh() {
    try {
      const page = await getJSON("/v1/posttrain/jobs");
      body.replaceChildren(...page.data.map(jobRow));
      empty.hidden = page.data.length > 0;
      refreshed.textContent = `updated ${new Date().toLocaleTimeString()}`;
    } catch (err) {
      refreshed.textContent = `refresh failed (${err.message}); retrying`;
    }
    setTimeout(refresh, 2000);
  }
  refresh();
}

// -- one job --------------------------------------------------------------------------------------

function niceTicks(lo, hi, count) {
  const span = hi - lo || 1;
  const raw = span / count;
  const mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((s) => s >= raw) || raw;
  const ticks = [];
  for (let t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) ticks.push(Number(t.toFixed(10)));
  return ticks;
}

function drawChart(chart, train, validation, totalSteps) {
  const valPts = [...validation.values()].filter((v) => v.loss !== null && v.loss !== undefined)
    .map((v) => [v.step, v.loss]);
  drawCurves(chart, [...train.entries()], valPts, totalSteps,
    { label: "loss", trainId: "train-curve", validationId: "validation-curve", what: "validation loss",
      floorZero: true });
}

// A GRPO job's reward curve: the step's mean reward, and the mean validation reward every
// eval_interval steps (ids reward-curve and valid-reward-curve); rewards may be negative.
function drawRewardChart(chart, rewards, validRewards, totalSteps) {
  drawCurves(chart, [...rewards.entries()], [...validRewards.entries()], totalSteps,
    { label: "reward", trainId: "reward-curve", validationId: "valid-reward-curve", what: "validation reward",
      floorZero: false, span: [0, 1] });
}

// One chart of a per-step curve (a line) and a sparser one (a line with dots), on a shared step axis.
function drawCurves(chart, trainIn, valIn, totalSteps, opts) {
  const W = 760, H = 300, L = 56, R = 16, T = 12, B = 36;
  const { trainId, validationId } = opts;
  const trainPts = trainIn.slice().sort((a, b) => a[0] - b[0]);
  const valPts = valIn.slice().sort((a, b) => a[0] - b[0]);
  const all = trainPts.concat(valPts);
  chart.replaceChildren();
  if (!all.length) {
    chart.append(svg("text", { x: W / 2, y: H / 2, "text-anchor": "middle" }, "waiting for the first training step…"));
    chart.append(svg("polyline", { id: trainId, class: "train", points: "", "data-points": 0 }));
    return;
  }
  // The x axis follows the steps seen so far (with room to grow), up to the job's total steps.
  const seen = Math.max(...all.map((p) => p[0]), 1);
  const xMax = totalSteps ? Math.min(Math.max(totalSteps, seen), Math.max(Math.ceil(seen * 1.15), seen + 5)) : seen;
  let yLo = Math.min(...all.map((p) => p[1]));
  let yHi = Math.max(...all.map((p) => p[1]));
  // A reward chart spans at least [0, 1] (a grader's usual range), so a flat start is not magnified.
  if (opts.span) { yLo = Math.min(yLo, opts.span[0]); yHi = Math.max(yHi, opts.span[1]); }
  const pad = (yHi - yLo) * 0.08 || Math.abs(yHi) * 0.1 || 1;
  const floor = opts.floorZero ? 0 : opts.span && yLo >= opts.span[0] ? opts.span[0] : -Infinity;
  yLo = Math.max(floor, yLo - pad);
  yHi += pad;
  const x = (v) => L + ((W - L - R) * v) / xMax;
  const y = (v) => T + (H - T - B) * (1 - (v - yLo) / (yHi - yLo));

  for (const t of niceTicks(yLo, yHi, 5)) {
    chart.append(svg("line", { class: "gridline", x1: L, x2: W - R, y1: y(t), y2: y(t) }));
    chart.append(svg("text", { x: L - 6, y: y(t) + 4, "text-anchor": "end" }, Number(t.toPrecision(4))));
  }
  for (const t of niceTicks(0, xMax, 8).filter((t) => Number.isInteger(t))) {
    chart.append(svg("line", { class: "axis", x1: x(t), x2: x(t), y1: H - B, y2: H - B + 4 }));
    chart.append(svg("text", { x: x(t), y: H - B + 16, "text-anchor": "middle" }, t));
  }
  chart.append(svg("line", { class: "axis", x1: L, x2: L, y1: T, y2: H - B }));
  chart.append(svg("line", { class: "axis", x1: L, x2: W - R, y1: H - B, y2: H - B }));
  chart.append(svg("text", { x: (L + W - R) / 2, y: H - 4, "text-anchor": "middle" }, "step"));
  chart.append(svg("text", { x: 12, y: (T + H - B) / 2, transform: `rotate(-90 12 ${(T + H - B) / 2})`,
    "text-anchor": "middle" }, opts.label));

  const line = (pts) => pts.map((p) => `${x(p[0]).toFixed(1)},${y(p[1]).toFixed(1)}`).join(" ");
  chart.append(svg("polyline", { id: trainId, class: "train", points: line(trainPts), "data-points": trainPts.length }));
  chart.append(svg("polyline", { id: validationId, class: "validation", points: line(valPts),
    "data-points": valPts.length }));
  for (const p of valPts) {
    const dot = svg("circle", { class: "validation", cx: x(p[0]), cy: y(p[1]), r: 3.5 });
    dot.append(svg("title", {}, `step ${p[0]}: ${opts.what} ${fmt(p[1])}`));
    chart.append(dot);
  }
}

function logLine(event) {
  const d = event.data || {};
  const time = new Date(event.created_at).toLocaleTimeString();
  let text;
  let level = "";
  switch (event.type) {
    case "state":
      text = `status ${d.status}` + (d.attempt ? ` (attempt ${d.attempt})` : "")
        + (d.reason ? `: ${d.reason}` : "") + (d.message ? `: ${d.code ? d.code + ": " : ""}${d.message}` : "");
      if (d.status === "failed") level = "error";
      break;
    case "started": {
      const r = d.resources || {};
      text = `trainer started on ${r.device || "?"} (${r.dtype || "?"}, ${r.threads || "?"} threads), `
        + `${d.total_steps} steps` + (d.resumed_from ? `, resumed from ${d.resumed_from}` : "");
      break;
    }
    case "checkpoint":
      text = `checkpoint epoch ${d.epoch} (step ${d.step}): validation loss ${fmt(d.validation_loss)} -> ${d.path}`;
      break;
    case "log":
      text = `${d.level || "info"}: ${d.message}`;
      level = d.level || "";
      break;
    default:
      text = `${event.type}: ${JSON.stringify(d)}`;
  }
  return el("span", { class: level }, `${time}  ${text}\n`);
}

function startJobPage() {
  const root = document.getElementById("job");
  const jobUuid = root.dataset.jobUuid;
  const q = encodeURIComponent(jobUuid);
  const $ = (id) => document.getElementById(id);
  const chart = $("chart"), statusEl = $("status"), cancel = $("cancel"), log = $("log");
  const pause = $("pause"), resume = $("resume");
  const train = new Map(); // step -> loss (a resumed attempt overwrites the steps it repeats)
  const validation = new Map(); // epoch -> {step, loss}
  const rewards = new Map(), validRewards = new Map(); // a GRPO job's: step -> mean reward
  const checkpoints = new Map(); // identifier -> checkpoint event data
  let cursor = 0, totalSteps = null, status = statusEl.textContent.trim(), latest = null;
  showTimes(document);

  function setStatus(value) {
    status = value;
    statusEl.textContent = value;
    statusEl.className = `status ${value}`;
    cancel.disabled = TERMINAL.has(value);
    pause.hidden = !PAUSABLE.has(value);
    resume.hidden = value !== "paused";
  }

  function renderCheckpoints() {
    const rows = [...checkpoints.values()].sort((a, b) => a.epoch - b.epoch || a.step - b.step).map((c) => {
      const row = el("tr", { "data-identifier": c.identifier });
      row.append(el("td", {}, c.epoch), el("td", {}, c.step), el("td", {}, fmt(c.train_loss)), // the mean over the epoch's steps
        el("td", {}, fmt(c.validation_loss)), el("td", {}, fmt(c.perplexity, 3)));
      const path = el("td");
      path.append(el("code", { title: c.identifier }, c.path));
      row.append(path);
      return row;
    });
    document.querySelector("#checkpoints tbody").replaceChildren(...rows);
    $("no-checkpoints").hidden = rows.length > 0;
  }

  function apply(events) {
    const lines = [];
    for (const e of events) {
      const d = e.data || {};
      if (e.type === "metric") {
        if (typeof d.loss === "number") train.set(d.step, d.loss);
        if (typeof d.reward_mean === "number") rewards.set(d.step, d.reward_mean);
        if (typeof d.valid_reward_mean === "number") validRewards.set(d.step, d.valid_reward_mean);
        if (d.total_steps) totalSteps = d.total_steps;
        latest = d;
        continue;
      }
      if (e.type === "started" && d.total_steps) totalSteps = d.total_steps;
      if (e.type === "checkpoint") {
        tryItNews(e);
        checkpoints.set(d.identifier, d);
        validation.set(d.epoch, { step: d.step, loss: d.validation_loss });
      }
      if (e.type === "state") {
        if (d.status === "in_progress") { $("started-at").textContent = localTime(e.created_at); }
        if (TERMINAL.has(d.status)) { $("completed-at").textContent = localTime(e.created_at); }
        if (d.message) { $("error").hidden = false; $("error").textContent = `${d.code || "error"}: ${d.message}`; }
      }
      lines.push(logLine(e));
    }
    if (lines.length) {
      const atBottom = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
      log.append(...lines);
      while (log.childNodes.length > 1000) log.firstChild.remove();
      if (atBottom) log.scrollTop = log.scrollHeight;
    }
  }

  function render() {
    drawChart(chart, train, validation, totalSteps);
    if (rewards.size || validRewards.size) {
      $("reward-section").hidden = false;
      drawRewardChart($("reward-chart"), rewards, validRewards, totalSteps);
      $("reward-points").textContent = `${rewards.size} point${rewards.size === 1 ? "" : "s"}`;
      $("valid-reward-points").textContent = `${validRewards.size} point${validRewards.size === 1 ? "" : "s"}`;
    }
    const plural = (n) => `${n} point${n === 1 ? "" : "s"}`;
    $("train-points").textContent = plural(train.size);
    $("validation-points").textContent = plural([...validation.values()].filter((v) => v.loss != null).length);
    if (latest) {
      $("progress").textContent = `step ${latest.step} of ${totalSteps || "?"}, epoch ${latest.epoch}`;
      $("last-step-loss").textContent = fmt(latest.loss); // the latest metric event: one step's loss
    } else if (totalSteps) {
      $("progress").textContent = `step 0 of ${totalSteps}`;
    }
    renderCheckpoints();
  }

  async function poll() {
    let delay = 1000;
    try {
      const page = await getJSON(`/v1/post-training/job/events?job_uuid=${q}&after=${cursor}&limit=1000`);
      apply(page.data);
      cursor = page.next_cursor;
      setStatus(page.status);
      if (page.data.length) render();
      if (page.data.length === 1000) delay = 0;
      else if (TERMINAL.has(page.status) && !page.data.length) return; // ended and fully read
    } catch (err) {
      delay = 3000;
    }
    setTimeout(poll, delay);
  }

  cancel.addEventListener("click", async () => {
    if (!window.confirm(`Cancel job ${jobUuid}?`)) return;
    cancel.disabled = true;
    $("cancel-message").textContent = "cancelling…";
    try {
      const response = await fetch("/v1/post-training/job/cancel", {
        method: "POST",
        headers: { "Content-Type": "application/json", "X-CSRF-Token": csrfToken() },
        body: JSON.stringify({ job_uuid: jobUuid }),
      });
      if (!response.ok) {
        const problem = await response.json().catch(() => ({}));
        throw new Error(problem.detail || `${response.status} ${response.statusText}`);
      }
      $("cancel-message").textContent = "cancel requested";
      const now = await getJSON(`/v1/post-training/job/status?job_uuid=${q}`);
      setStatus(now.status);
    } catch (err) {
      $("cancel-message").textContent = `cancel failed: ${err.message}`;
      cancel.disabled = TERMINAL.has(status);
    }
  });

  // Pause and resume: our own endpoints, with the page's CSRF token like the cancel.
  async function control(button, action) {
    button.disabled = true;
    $("cancel-message").textContent = `${action}…`;
    try {
      const response = await fetch(`/v1/posttrain/jobs/${q}/${action}`, {
        method: "POST",
        headers: { "X-CSRF-Token": csrfToken() },
      });
      const answer = await response.json().catch(() => ({}));
      if (!response.ok) throw new Error(answer.detail || `${response.status} ${response.statusText}`);
      $("cancel-message").textContent = `${action} requested`;
      setStatus(answer.status); // the poll keeps it current from here (pausing, then paused)
    } catch (err) {
      $("cancel-message").textContent = `${action} failed: ${err.message}`;
    }
    button.disabled = false;
  }
  pause.addEventListener("click", () => control(pause, "pause"));
  resume.addEventListener("click", () => control(resume, "resume"));

  render();
  poll();
}

// -- Try it: one prompt to a checkpoint of the job and to its base model, both streamed ------------

// What an error response says: OpenAI's envelope ({"error": {"message"}}) on /v1/chat, an RFC 7807
// problem ({"detail"}) where the gate refused the call before it got there.
function errorText(body, response) {
  if (body && body.error && body.error.message) return body.error.message;
  if (body && body.detail) return typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
  return `${response.status} ${response.statusText}`;
}

// POST /v1/chat/completions with stream: true, appending each chunk's text to `answer` as it comes.
// The SSE body is read line by line: "data: {chunk}" until "data: [DONE]"; a chunk holding "error"
// is a failure after the 200 went out.
async function streamChat(body, answer, meta, signal) {
  answer.textContent = "";
  answer.classList.remove("error");
  meta.textContent = "waiting for the first token…";
  const started = performance.now();
  let first = null, finish = null, chunks = 0;
  const fail = (message) => {
    answer.classList.add("error");
    answer.textContent += (answer.textContent ? "\n" : "") + message;
    meta.textContent = "failed";
  };
  let response;
  try {
    response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json", Accept: "text/event-stream", "X-CSRF-Token": csrfToken() },
      body: JSON.stringify(body),
      signal,
    });
  } catch (err) {
    fail(err.name === "AbortError" ? "stopped" : `request failed: ${err.message}`);
    return;
  }
  if (!response.ok) {
    fail(errorText(await response.json().catch(() => null), response));
    return;
  }
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      const lines = buffer.split("\n");
      buffer = lines.pop();
      for (const raw of lines) {
        const line = raw.replace(/\r$/, "");
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") {
          const seconds = ((performance.now() - started) / 1000).toFixed(2);
          const ttft = first === null ? "–" : `${((first - started) / 1000).toFixed(2)} s to the first token, `;
          meta.textContent = `${ttft}${seconds} s in all, ${chunks} chunks, finish_reason ${finish || "–"}`;
          answer.dataset.done = "true";
          await reader.cancel().catch(() => {});
          return;
        }
        const chunk = JSON.parse(data);
        if (chunk.error) {
          fail(chunk.error.message || JSON.stringify(chunk.error));
          return;
        }
        for (const choice of chunk.choices || []) {
          const text = choice.delta && choice.delta.content;
          if (text) {
            if (first === null) first = performance.now();
            answer.textContent += text;
            chunks += 1;
            meta.textContent = "streaming…";
          }
          if (choice.finish_reason) finish = choice.finish_reason;
        }
      }
    }
    fail("the stream ended before [DONE]");
  } catch (err) {
    fail(err.name === "AbortError" ? "stopped" : `stream failed: ${err.message}`);
  }
}

// The panel lists the checkpoints there were when the page was rendered: one written later is a
// reload away (the page says so once).
function tryItNews(event) {
  const section = document.getElementById("try-it");
  if (!section || document.getElementById("try-newer")) return;
  if (Date.parse(event.created_at) <= Date.parse(section.dataset.renderedAt)) return;
  const none = document.getElementById("try-none");
  const note = el("p", { id: "try-newer" }, none ? "A checkpoint is ready: " : "A newer checkpoint was written: ");
  note.append(el("a", { href: "" }, "reload the page to try it"));
  if (none) none.replaceWith(note);
  else section.querySelector("h2").after(note);
}

function startTryIt() {
  const form = document.getElementById("try-form");
  if (!form) return; // the job has no checkpoint yet
  const $ = (id) => document.getElementById(id);
  const select = $("try-model"), send = $("try-send"), stop = $("try-stop");
  const baseModel = form.dataset.baseModel;
  let controller = null;
  select.addEventListener("change", () => { $("try-trained-name").textContent = select.value; });

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const message = $("try-message").value;
    if (!message.trim()) { $("try-message").focus(); return; }
    const messages = [];
    if ($("try-system").value.trim()) messages.push({ role: "system", content: $("try-system").value });
    messages.push({ role: "user", content: message });
    const request = (model) => ({
      model, messages, stream: true,
      max_tokens: Number($("try-max-tokens").value) || 64,
      temperature: Number($("try-temperature").value) || 0,
    });
    controller = new AbortController();
    send.disabled = true;
    stop.hidden = false;
    $("try-trained-name").textContent = select.value;
    for (const answer of document.querySelectorAll(".try-answer")) delete answer.dataset.done;
    const columns = [streamChat(request(select.value), $("try-trained-answer"), $("try-trained-meta"), controller.signal)];
    if (baseModel) columns.push(streamChat(request(baseModel), $("try-base-answer"), $("try-base-meta"), controller.signal));
    await Promise.all(columns);
    send.disabled = false;
    stop.hidden = true;
    controller = null;
  });
  stop.addEventListener("click", () => { if (controller) controller.abort(); });
  $("try-message").addEventListener("keydown", (event) => { // Ctrl+Enter (or Cmd+Enter) sends
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey) && !send.disabled) form.requestSubmit();
  });
}

document.addEventListener("DOMContentLoaded", () => {
  const page = document.body.dataset.page;
  if (page === "jobs") startJobsPage();
  else if (page === "job") { startJobPage(); startTryIt(); }
  else showTimes(document);
});
