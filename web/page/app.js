// talkmesh's web page: speech in, a style chosen or adapted, the animated face in 3D.
// three.js comes from npm (web/node_modules, served at /ui/vendor/three); the motion is the
// service's glTF export (POST /v1/animate format=glb) played by an AnimationMixer whose time
// follows the <audio> element, so picture and sound stay in sync.
import * as THREE from "three";
import { GLTFLoader } from "three/addons/loaders/GLTFLoader.js";
import { OrbitControls } from "three/addons/controls/OrbitControls.js";

const $ = (id) => document.getElementById(id);
const player = $("player");
const state = { speech: null, clips: 0, duration: 0 };

// ---- the service ------------------------------------------------------------------------
function base(endpoint) {
  return (endpoint || "").replace(/\/+$/, "");
}

async function api(path, options = {}, endpoint = "") {
  const headers = new Headers(options.headers || {});
  const key = $("key").value.trim();
  if (key) headers.set("Authorization", `Bearer ${key}`);
  const r = await fetch(base(endpoint) + path, { ...options, headers });
  if (!r.ok) {
    let msg = `${r.status}`;
    try {
      const e = (await r.json()).error;
      msg = `${e.field ? e.field + ": " : ""}${e.message}`;
    } catch (_) { /* not the error schema */ }
    throw new Error(msg);
  }
  return r;
}

function say(id, text, isError = false) {
  $(id).textContent = text;
  $(id).classList.toggle("error", isError);
}

// ---- audio: any format the browser decodes, sent as 16-bit PCM WAV -------------------------
async function toWav(blob) {
  const ctx = new AudioContext();
  try {
    const buf = await ctx.decodeAudioData(await blob.arrayBuffer());
    const n = buf.length, rate = buf.sampleRate;
    const mono = new Float32Array(n);
    for (let c = 0; c < buf.numberOfChannels; c++) {
      const ch = buf.getChannelData(c);
      for (let i = 0; i < n; i++) mono[i] += ch[i] / buf.numberOfChannels;
    }
    const out = new DataView(new ArrayBuffer(44 + 2 * n));
    const text = (o, s) => [...s].forEach((ch, i) => out.setUint8(o + i, ch.charCodeAt(0)));
    text(0, "RIFF"); out.setUint32(4, 36 + 2 * n, true); text(8, "WAVE"); text(12, "fmt ");
    out.setUint32(16, 16, true); out.setUint16(20, 1, true); out.setUint16(22, 1, true);
    out.setUint32(24, rate, true); out.setUint32(28, 2 * rate, true); out.setUint16(32, 2, true);
    out.setUint16(34, 16, true); text(36, "data"); out.setUint32(40, 2 * n, true);
    for (let i = 0; i < n; i++) out.setInt16(44 + 2 * i, Math.max(-1, Math.min(1, mono[i])) * 0x7fff, true);
    return new Blob([out.buffer], { type: "audio/wav" });
  } finally {
    ctx.close();
  }
}

async function useSpeech(blob) {
  try {
    state.speech = await toWav(blob);
  } catch (e) {
    say("status", `speech: the browser cannot decode this file (${e.message})`, true);
    return;
  }
  player.src = URL.createObjectURL(state.speech);
  $("animate").disabled = false;
  say("status", "");
}

let recorder = null;
async function toggleRecording() {
  if (recorder) { recorder.stop(); return; }
  const stream = await navigator.mediaDevices.getUserMedia({ audio: true });
  const parts = [];
  recorder = new MediaRecorder(stream);
  recorder.ondataavailable = (e) => parts.push(e.data);
  recorder.onstop = () => {
    stream.getTracks().forEach((t) => t.stop());
    recorder = null;
    $("record").textContent = "Record";
    useSpeech(new Blob(parts, { type: parts[0]?.type || "audio/webm" }));
  };
  recorder.start();
  $("record").textContent = "Stop";
}

// ---- styles --------------------------------------------------------------------------------
async function fillStyles(select, endpoint) {
  const info = await (await api("/v1/info", {}, endpoint)).json();
  const styles = (await (await api("/v1/styles?limit=100", {}, endpoint)).json()).styles;
  select.replaceChildren(new Option(`default (${info.default_style})`, ""));
  for (const s of info.train_subjects) select.add(new Option(`speaker ${s}`, s));
  for (const s of styles.filter((s) => s.status === "ready")) select.add(new Option(`style ${s.name || s.style_id}`, s.style_id));
  return info;
}

async function adapt() {
  const audio = $("ref-audio").files[0], motion = $("ref-motion").files[0];
  if (!audio || !motion) { say("adapt-status", "reference: choose its speech and its motion (.npy)", true); return; }
  const form = new FormData();
  form.append("audio", await toWav(audio), "reference.wav");
  form.append("motion", motion, motion.name);
  if ($("ref-template").files[0]) form.append("template", $("ref-template").files[0], "template.npy");
  form.append("name", $("ref-name").value);
  $("adapt-progress").hidden = false;
  try {
    let style = await (await api("/v1/styles?wait_s=0", { method: "POST", body: form })).json();
    while (style.status === "pending") {
      const t = style.run_s != null ? `adapting, ${style.run_s.toFixed(0)} s` : `queued, ${(style.queue_s || 0).toFixed(0)} s`;
      say("adapt-status", t);
      await new Promise((ok) => setTimeout(ok, 1000));
      style = await (await api(`/v1/styles/${style.style_id}`)).json();
    }
    if (style.status !== "ready") throw new Error(style.error || style.status);
    say("adapt-status", `ready: ${style.style_id}${style.wall_s ? ` (${style.wall_s.toFixed(1)} s)` : ""}`);
    $("style").add(new Option(`style ${style.name || style.style_id}`, style.style_id));
    $("style").value = style.style_id;
  } catch (e) {
    say("adapt-status", `adaptation failed: ${e.message}`, true);
  } finally {
    $("adapt-progress").hidden = true;
  }
}

// ---- the 3D viewers ------------------------------------------------------------------------
class Viewer {
  constructor(figure) {
    this.figure = figure;
    this.renderer = new THREE.WebGLRenderer({ antialias: true, preserveDrawingBuffer: true });
    this.renderer.setPixelRatio(window.devicePixelRatio);
    figure.appendChild(this.renderer.domElement);
    this.scene = new THREE.Scene();
    this.scene.background = new THREE.Color(0xdde3e6);
    this.scene.add(new THREE.HemisphereLight(0xffffff, 0x667788, 1.6));
    const key = new THREE.DirectionalLight(0xffffff, 2.2);
    key.position.set(1, 1.5, 2);
    this.scene.add(key);
    this.camera = new THREE.PerspectiveCamera(30, 1, 0.001, 100);
    this.controls = new OrbitControls(this.camera, this.renderer.domElement);
    this.mixer = null;
    this.root = null;
  }

  async load(glb, caption) {
    const gltf = await new GLTFLoader().parseAsync(glb, "");
    if (this.root) this.scene.remove(this.root);
    this.root = gltf.scene;
    const skin = new THREE.MeshStandardMaterial({ color: 0xd9a38a, roughness: 0.6, side: THREE.FrontSide });
    const inside = new THREE.MeshStandardMaterial({ color: 0x5a1e24, roughness: 0.9, side: THREE.BackSide });
    const meshes = [];
    this.root.traverse((o) => { if (o.isMesh) meshes.push(o); });
    for (const mesh of meshes) {
      mesh.material = skin;
      // The inside of the head (seen through the parted lips) in a dark mouth colour: the same
      // geometry drawn from its back faces, with the morph weights the animation moves shared.
      const back = new THREE.Mesh(mesh.geometry, inside);
      if (mesh.morphTargetInfluences) back.morphTargetInfluences = mesh.morphTargetInfluences;
      mesh.add(back);
    }
    this.scene.add(this.root);
    const box = new THREE.Box3().setFromObject(this.root);
    const center = box.getCenter(new THREE.Vector3()), size = box.getSize(new THREE.Vector3()).length();
    this.controls.target.copy(center);
    this.camera.position.copy(center).add(new THREE.Vector3(0, 0, 2.2 * size));
    this.camera.near = size / 100; this.camera.far = size * 100;
    this.camera.updateProjectionMatrix();
    this.mixer = new THREE.AnimationMixer(this.root);
    const clip = gltf.animations[0];
    this.mixer.clipAction(clip).play();
    this.figure.querySelector("figcaption").textContent = caption;
    return clip.duration;
  }

  draw(t) {
    const w = this.figure.clientWidth, h = this.figure.clientHeight;
    if (w && h && (this.renderer.domElement.width !== w || this.renderer.domElement.height !== h)) {
      this.renderer.setSize(w, h, false);
      this.camera.aspect = w / h;
      this.camera.updateProjectionMatrix();
    }
    if (this.mixer) this.mixer.setTime(t);
    this.controls.update();
    this.renderer.render(this.scene, this.camera);
  }
}

const viewers = [new Viewer($("view-a")), new Viewer($("view-b"))];

function frame() {
  const t = player.currentTime || 0;
  viewers.forEach((v, i) => { if (i === 0 || !$("view-b").hidden) v.draw(t); });
  if (state.duration) {
    $("seek").value = String(t / state.duration);
    $("time").textContent = `${t.toFixed(2)} s`;
  }
  requestAnimationFrame(frame);
}

// ---- animate, compare, download --------------------------------------------------------------
function animateForm(style, format) {
  const form = new FormData();
  form.append("audio", state.speech, "speech.wav");
  form.append("style_id", style);
  form.append("format", format);
  return form;
}

async function animate() {
  if (!state.speech) return;
  $("animate").disabled = true;
  say("status", "animating…");
  try {
    const jobs = [[viewers[0], "", $("style").value]];
    const compare = $("compare").checked;
    $("view-b").hidden = !compare;
    if (compare) jobs.push([viewers[1], $("endpoint-b").value.trim(), $("style-b").value]);
    const durations = await Promise.all(jobs.map(async ([viewer, endpoint, style]) => {
      const r = await api("/v1/animate", { method: "POST", body: animateForm(style, "glb") }, endpoint);
      const label = `${r.headers.get("X-Talkmesh-Model")} · ${style || "default style"}`;
      return viewer.load(await r.arrayBuffer(), label);
    }));
    state.duration = Math.max(...durations);
    state.clips += 1;
    player.currentTime = 0;
    $("play").disabled = false;
    $("downloads").hidden = false;
    say("status", `${state.duration.toFixed(2)} s of motion`);
    document.body.dataset.clips = String(state.clips);
  } catch (e) {
    say("status", `animation failed: ${e.message}`, true);
  } finally {
    $("animate").disabled = false;
  }
}

async function download(format) {
  try {
    const r = await api("/v1/animate", { method: "POST", body: animateForm($("style").value, format) });
    const a = document.createElement("a");
    a.href = URL.createObjectURL(await r.blob());
    a.download = `talkmesh.${format}`;
    a.click();
  } catch (e) {
    say("status", `download failed: ${e.message}`, true);
  }
}

// ---- leaderboard and model card -------------------------------------------------------------
async function showBoard() {
  try {
    const board = await (await api("/v1/leaderboard")).json();
    const cols = ["name", "model", "lve", "fdd", "rtf", "sequences"];
    const table = document.createElement("table");
    table.dataset.protocol = board.protocol_id;
    table.createTHead().insertRow().append(...["row", "model", "LVE [95% CI]", "FDD [95% CI]", "RTF", "seqs"].map((h) => {
      const th = document.createElement("th"); th.textContent = h; return th;
    }));
    const body = table.createTBody();
    for (const r of board.rows) {
      const row = body.insertRow();
      for (const c of cols) {
        let v = r[c];
        if (c === "lve" || c === "fdd") v = `${r.metrics[c]?.toPrecision(4)} [${(r.ci[c] || []).map((x) => x.toPrecision(3)).join(", ")}]`;
        if (c === "rtf") v = v == null ? "-" : v.toFixed(3);
        row.insertCell().textContent = v;
      }
    }
    const note = document.createElement("p");
    note.textContent = `protocol ${board.protocol_id}: ${board.protocol.dataset} ${board.protocol.split}`;
    $("leaderboard").replaceChildren(table, note);
  } catch (e) {
    $("leaderboard").textContent = `no leaderboard: ${e.message}`;
  }
  try {
    $("card").textContent = (await (await api("/v1/model-card")).json()).card;
  } catch (e) {
    $("card").textContent = `no model card: ${e.message}`;
  }
}

// ---- wiring ----------------------------------------------------------------------------------
async function connect() {
  localStorage.setItem("talkmesh-key", $("key").value);
  try {
    const info = await fillStyles($("style"), "");
    $("model").textContent = `${info.method} · ${info.model} · ${info.fps} fps`;
    await fillStyles($("style-b"), $("endpoint-b").value.trim()).catch(() => {});
    await showBoard();
    document.body.dataset.ready = "true";
  } catch (e) {
    $("model").textContent = `cannot reach the service: ${e.message}`;
  }
}

$("key").value = localStorage.getItem("talkmesh-key") || "";
$("key").addEventListener("change", connect);
$("endpoint-b").addEventListener("change", () => fillStyles($("style-b"), $("endpoint-b").value.trim()).catch((e) => say("status", e.message, true)));
$("audio").addEventListener("change", (e) => e.target.files[0] && useSpeech(e.target.files[0]));
$("record").addEventListener("click", () => toggleRecording().catch((e) => say("status", `recording: ${e.message}`, true)));
$("adapt").addEventListener("click", adapt);
$("animate").addEventListener("click", animate);
$("play").addEventListener("click", () => (player.paused ? player.play() : player.pause()));
player.addEventListener("play", () => { $("play").textContent = "Pause"; });
player.addEventListener("pause", () => { $("play").textContent = "Play"; });
$("seek").addEventListener("input", (e) => { player.currentTime = Number(e.target.value) * state.duration; });
document.querySelectorAll("#downloads button").forEach((b) => b.addEventListener("click", () => download(b.dataset.format)));

// For tests and scripts: move both faces to time t (seconds) without playing.
window.talkmesh = {
  seek: (t) => new Promise((ok) => {
    player.addEventListener("seeked", ok, { once: true });
    player.currentTime = t;
  }),
};
requestAnimationFrame(frame);
connect();
