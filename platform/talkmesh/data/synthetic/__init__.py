"""The synthetic corpus (datasets.md section 8): seeded, deterministic, with known structure.

Every clip is generated from one **phoneme timeline**, and both the audio and the motion are
rendered from that same timeline, so audio predicts motion up to the speaker's style, and
every style parameter is recorded in ``meta.json`` (``speaker_styles``).

Generative model
----------------
Face model. A small FLAME-structured head (``face_model.npz``, the FLAME npz layout with
``num_shape_components = 100``) rendered by :class:`talkmesh.face.flame.FlameLayer`; the
corpus has no skinning code of its own.

- Template: a latitude/longitude head (ellipsoid with nose, lips, chin, eye sockets, brow
  ridge, cheeks, ears and a neck), denser at the front. ``small``: 170 vertices, a closed
  coarse head (what the learning checks are calibrated on). ``default``: 5042 vertices
  (FLAME has 5023) with a readable face (``Preset.face_detail``): eyeballs in sockets under
  lids and brows, a nose with bridge, tip and wings, full lips that meet along a mouth slit
  (the only opening of the mesh) and part in an arc as the jaw opens, a chin below a fold.
- Shape basis (100): width/height/depth scalings, then smooth random fields with decaying
  amplitude. Each speaker has a shape beta ~ N(0, 1); its template is FLAME(beta).
- Expression basis (50). The leading components have fixed meanings (``EXPRESSION_COMPONENTS``):
  0 jaw-open (lip parting), 1 lip-round, 2 smile, 3 brow-raise, 4 blink, 5 lip-press,
  6 brow-furrow, 7 lip-spread, 8 mouth-asymmetry. Components 9..49 are small smooth local
  deformations (random Gaussian bumps) that carry a speaker's idiosyncratic offsets.
- Joints root, neck, jaw, eyes (FLAME's tree); the jaw joint sits behind the mouth and the
  lower lip, chin and lower face are skinned to it, so jaw rotation (x axis) opens the mouth.
- Regions (disjoint): lips (upper + lower lip) and the upper face (forehead + eye region),
  written as ``regions/lve.txt``, ``regions/fdd.txt`` and ``FLAME_masks.pkl``.

Speakers. 12 speakers split like VOCASET: 8 train, 2 val, 2 test. Each has recorded style
parameters (``STYLE_RANGES``, drawn by stratified sampling so every parameter spans its
range): articulation gain, lip rounding, coarticulation time constant, asymmetry, brow
activity, head-motion amplitude and rhythm (frequency), blink rate, speaking rate, voice
pitch (f0) and formant scale; plus a per-phoneme-class head-rotation offset table, static
idiosyncratic expression offsets and the shape beta.

Content. A pool of sentences (shared across speakers, like VOCASET's sentences) built from
CV(C) syllables over ``PHONEMES``; one stressed syllable per word, one or two emphasised
words per sentence. Transcripts are the phoneme strings (one character per phoneme, a space
per pause). Phoneme durations are scaled by the speaker's speaking rate and the emotion.

Audio (22050 Hz int16, so loaders must resample). Source-filter synthesis per phoneme
segment, cross-faded at the boundaries: a glottal pulse train at the speaker's f0 contour
(declination, pitch accents on stressed syllables, slow jitter) through a cascade of formant
resonators scaled by the speaker's formant scale (vowels, approximants, nasals, voice bars of
voiced plosives and fricatives); band-passed noise for fricatives and aspiration; decaying
noise bursts at plosive releases; silence (a tiny noise floor) in pauses. The vocal level of a
phoneme rises with its jaw opening (open vowels are loud) and its stress.

Motion at the corpus fps, FLAME-56 = expression 50 | jaw 3 | head rotation 3. Viseme targets
per phoneme (jaw opening, lip rounding, lip spread, lip closure for bilabials and
labiodentals) are smoothed by coarticulation: a first-order low-pass run forwards and
backwards (critically damped, anticipatory and carry-over) with the speaker's time constant.
They are scaled by articulation gain, lip-rounding style and asymmetry. The upper face gets
brow raises at emphasised syllables and following the vocal energy (scaled by brow activity),
and seeded blinks. Head rotation = the speaker's amplitude x (sinusoids at its rhythm +
per-phoneme-class offsets + nods at emphasis).

Emotions (0-based EMOTE labels, datasets.md 5.2): 0 neutral (intensity 0), 1 happy, 2 sad,
6 angry with intensity 0..2. They change the voice (pitch, energy, rate) and the face (smile
for happy, brow raise/furrow for sad and angry, articulation and head-motion scaling), see
``EMOTION_EFFECTS``.

Vertices are stored with **zero head rotation** (and zero neck and eyes): the head pose lives
only in params columns 53:56, never inside LVE/FDD (datasets.md 6.2). ``vertices_npy`` equals
``FlameLayer(face_model.npz).vertices_from_params(params[:, :53], shape=beta)``.

On disk (the processed layout read by :class:`ProcessedCorpus`)::

    vertices_npy/<stem>.npy   (T, V*3) float32       wav/<stem>.wav      22050 Hz int16
    params_npy/<stem>.npy     (T, 56) float32        text/<stem>.txt     phoneme string
    templates.pkl             subject -> (V, 3)      face_model.npz      FLAME npz layout
    regions/lve.txt, regions/fdd.txt, FLAME_masks.pkl                    vertex regions
    meta.json                 generator version, preset, seed, fps, audio rate, speakers
                              (split role, style, shape), emotions, phonemes, sequences

Stems are ``S01_seq03``. Splits: per training speaker the first sequences are ``train``, then
``val``, then ``test-A``; for the val and test speakers the first sequences are the
``reference`` pool (metrics.md 6.3) and the rest ``val`` resp. ``test-B``.
Same seed -> byte-identical arrays (the npz archive's zip timestamps aside); the default
preset generates in well under a minute on 2 cores.

Modules: ``presets`` (sizes, tables, seeded streams), ``face`` (the face model),
``content`` (speakers, sentences, timelines, the sequence plan), ``audio`` and ``motion``
(rendering a timeline), ``writer`` (one corpus into a directory), ``store`` (atomic
generation, the cache, ``meta.json``), ``timelines`` (a stored clip's phoneme timeline and
per-frame phoneme classes, regenerated from ``meta.json``), ``corpus`` (the reader).
"""

from talkmesh.data.synthetic.content import frame_phoneme_classes
from talkmesh.data.synthetic.corpus import SyntheticCorpus
from talkmesh.data.synthetic.face import build_face_model
from talkmesh.data.synthetic.presets import (
    AUDIO_RATE,
    EMOTION_EFFECTS,
    EMOTIONS,
    EXPR,
    EXPRESSION_COMPONENTS,
    GENERATOR_VERSION,
    PHONEME_CLASSES,
    PHONEMES,
    PRESETS,
    STYLE_RANGES,
)
from talkmesh.data.synthetic.store import cache_path, ensure_cached, generate_corpus, read_meta, speaker_styles
from talkmesh.data.synthetic.timelines import clip_timeline, phoneme_classes

__all__ = [
    "AUDIO_RATE",
    "EMOTIONS",
    "EMOTION_EFFECTS",
    "EXPR",
    "EXPRESSION_COMPONENTS",
    "GENERATOR_VERSION",
    "PHONEMES",
    "PHONEME_CLASSES",
    "PRESETS",
    "STYLE_RANGES",
    "SyntheticCorpus",
    "build_face_model",
    "cache_path",
    "clip_timeline",
    "ensure_cached",
    "frame_phoneme_classes",
    "generate_corpus",
    "phoneme_classes",
    "read_meta",
    "speaker_styles",
]
