"""The browser page served at ``/``: record from the microphone and stream it over the WebSocket
(partials while speaking, the final transcript after Stop), or upload a file to
``POST /v1/recognize``. Plain HTML and JavaScript, no build step and nothing fetched from
elsewhere: an inference node's page must work without the internet.

The microphone is read through an ``AudioContext`` at 16 kHz where the browser offers it (the
browser resamples), else at its own rate, which the start message declares; samples go out as
16-bit little-endian PCM every ~256 ms. Capture starts as soon as the microphone is open (chunks
wait until the socket is), and "stop after N s" ends the recording by itself.
"""

from __future__ import annotations

__all__ = ["PAGE"]

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>hpc_asr: speech recognition</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body { font: 16px/1.5 system-ui, sans-serif; max-width: 46rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
 h1 { font-size: 1.4rem; } button { font-size: 1rem; padding: .4rem 1rem; margin-right: .5rem; }
 .box { border: 1px solid #ccc; border-radius: 6px; padding: .6rem .8rem; min-height: 1.6rem; margin: .4rem 0 1rem; }
 #partial { color: #777; font-style: italic; } #final { font-weight: 600; } #status { color: #555; font-size: .9rem; }
 section { margin-bottom: 1.6rem; }
</style></head>
<body>
<h1>hpc_asr speech recognition</h1>
<section>
 <button id="record">Record</button><button id="stop" disabled>Stop</button>
 <label>stop after <input id="seconds" type="number" min="0.5" step="0.5" style="width:4rem"> s</label>
 <span id="status">idle</span>
 <div>Partial</div><div id="partial" class="box"></div>
 <div>Final</div><div id="final" class="box"></div>
</section>
<section>
 <input type="file" id="file" accept="audio/*,.wav,.flac"> <button id="upload">Recognize file</button>
 <div>File transcript</div><div id="upload-result" class="box"></div>
</section>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
let ws = null, ctx = null, source = null, proc = null, stream = null, pending = [];

function status(text) { $("status").textContent = text; }

function toPcm16(f32) {
  const out = new Int16Array(f32.length);
  for (let i = 0; i < f32.length; i++) {
    const s = Math.max(-1, Math.min(1, f32[i]));
    out[i] = Math.round(s < 0 ? s * 32768 : s * 32767);
  }
  return out.buffer;
}

async function record() {
  $("record").disabled = true; $("partial").textContent = ""; $("final").textContent = "";
  try {
    stream = await navigator.mediaDevices.getUserMedia({ audio: { echoCancellation: false,
      noiseSuppression: false, autoGainControl: false, channelCount: 1 } });
  } catch (e) { status("microphone: " + e.message); $("record").disabled = false; return; }
  try { ctx = new AudioContext({ sampleRate: 16000 }); } catch (e) { ctx = new AudioContext(); }
  // Capture starts now; chunks wait in `pending` until the socket is open, so no speech is lost.
  const limit = parseFloat($("seconds").value) * ctx.sampleRate;  // NaN (empty field): no limit
  let sent = 0;
  pending = [];
  source = ctx.createMediaStreamSource(stream);
  proc = ctx.createScriptProcessor(4096, 1, 1);
  proc.onaudioprocess = (ev) => {
    let x = ev.inputBuffer.getChannelData(0);
    if (sent + x.length >= limit) x = x.subarray(0, Math.max(0, limit - sent));
    sent += x.length;
    pending.push(toPcm16(x));
    if (ws && ws.readyState === WebSocket.OPEN) { pending.forEach((b) => ws.send(b)); pending = []; }
    if (sent >= limit) stop();
  };
  const mute = ctx.createGain(); mute.gain.value = 0;
  source.connect(proc); proc.connect(mute); mute.connect(ctx.destination);
  ws = new WebSocket((location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/v1/stream");
  ws.binaryType = "arraybuffer";
  ws.onopen = () => {
    ws.send(JSON.stringify({ type: "start", rate: ctx.sampleRate }));
    pending.forEach((b) => ws.send(b)); pending = [];
    if (!proc) { ws.send(JSON.stringify({ type: "end" })); status("finishing"); return; }  // stopped already
    $("stop").disabled = false; status("recording at " + ctx.sampleRate + " Hz");
  };
  ws.onmessage = (ev) => {
    const msg = JSON.parse(ev.data);
    if (msg.type === "partial") $("partial").textContent = msg.text;
    else if (msg.type === "final") { $("final").textContent = msg.text; status("done"); }
    else if (msg.type === "error") status("error " + msg.status + ": " + msg.error);
  };
  ws.onclose = (ev) => { if (ev.code !== 1000 && ev.code !== 1005) status("closed (" + ev.code + ") " + ev.reason);
    $("record").disabled = false; $("stop").disabled = true; };
  ws.onerror = () => status("connection error");
}

function stop() {
  $("stop").disabled = true;
  if (!proc) return;
  proc.disconnect(); proc.onaudioprocess = null; proc = null;
  if (source) source.disconnect();
  if (stream) stream.getTracks().forEach((t) => t.stop());
  if (ctx) ctx.close();
  if (ws && ws.readyState === WebSocket.OPEN) { ws.send(JSON.stringify({ type: "end" })); status("finishing"); }
}

async function upload() {
  const f = $("file").files[0];
  if (!f) { status("choose a file first"); return; }
  status("uploading " + f.name);
  const r = await fetch("/v1/recognize", { method: "POST", body: f,
    headers: { "Content-Type": f.type || "application/octet-stream" } });
  const body = await r.json();
  $("upload-result").textContent = r.ok ? body.text : "error " + r.status + ": " + body.error;
  status(r.ok ? "file done" : "file refused");
}

$("record").onclick = record; $("stop").onclick = stop; $("upload").onclick = upload;
</script>
</body></html>
"""
