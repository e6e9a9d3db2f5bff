"""A synthetic cohort of annotated H&E whole-slide images of bile-duct lesions.

No real cohort can ship with the project, so the demo, the tests and the benchmarks run on slides drawn here:
pyramidal JPEG-tiled TIFF files that OpenSlide reads (``generic-tiff`` vendor, with ``openslide.mpp-x``),
QuPath GeoJSON annotations and a ``cohort.csv`` (see ``docs/formats.md``).

The images are rendered with a Beer–Lambert stain model: hematoxylin and eosin concentration maps are drawn
(fibrous stroma, ducts, glands, nuclei), then turned into RGB with per-slide stain vectors, intensities and
background tint. The classes are built so that **colour alone does not separate them** while **structure does**:

* benign regions (biliary adenoma, bile-duct hamartoma): regular round ducts, one layer of small uniform
  round nuclei, in stroma with lymphocytes and fibroblasts;
* malignant regions (cholangiocarcinoma): angular, branching, crowded glands lined by several layers of large,
  pleomorphic, hyperchromatic or vesicular nuclei.

Whatever its glands bring, every region is then topped up (lymphocytes, fibroblasts, small vessels) to shares
of nuclei and of empty space drawn from one distribution for both classes; stroma density, cytoplasm and
staining strength vary region by region, and each slide gets its own stain (vectors turned, intensities scaled,
background tinted). So colour histograms of the two classes overlap, while nuclear size, crowding and gland
shape still tell them apart.

Everything is deterministic given the seed: one :class:`numpy.random.Generator` per slide, seeded from
``(seed, patient index, slide index)``.

Modules: :mod:`~python_task.synth.config` (what to make: the cohort plan, light), :mod:`~python_task.synth.render`
(drawing a slide), :mod:`~python_task.synth.tiff` (writing it as a pyramidal TIFF) and
:mod:`~python_task.synth.cohort` (the whole cohort on disk).
"""
