"""MONAI Deploy App SDK 4 application for the bundle's CT models.

Run it locally (the SDK's arguments; each falls back to its environment variable)::

    python -m anatomy_vlp_bundle.apps.deploy -i <dicom_dir> -o <out_dir> -m <model.ts>
    HOLOSCAN_INPUT_PATH=<dicom_dir> HOLOSCAN_OUTPUT_PATH=<out_dir> HOLOSCAN_MODEL_PATH=<model.ts> \
        python -m anatomy_vlp_bundle.apps.deploy

Operators and flows (``compose``)::

    dicom_loader           DICOMDataLoaderOperator      dicom_study_list -> ct_series_selector, anatomy_vlp_inference
    ct_series_selector     DICOMSeriesSelectorOperator  study_selected_series_list -> anatomy_vlp_inference
    anatomy_vlp_inference  AnatomyVLPInferenceOperator  prediction -> anatomy_box_seg_writer
                                                        report, study_selected_series_list -> report_sr_writer
    anatomy_box_seg_writer AnatomyBoxSegWriterOperator  (files)
    report_sr_writer       DICOMTextSRWriterOperator    (files)

- the loader reads every DICOM file under the input folder (sub-folders too);
- the selector keeps the CT series (:data:`CT_SELECTION_RULES`, ``Modality`` CT) of each study, the
  one with the most instances first; the inference operator takes the series with the most instances
  over all studies;
- :class:`AnatomyVLPInferenceOperator` copies that series' files into a temporary folder and calls
  :meth:`anatomy_vlp_bundle.inference.Predictor.predict` on it, so that reading, orientation and
  preprocessing are exactly the bundle's (``Predictor.predict`` on the series' own folder gives the
  same result). It writes ``<out>/result.json``: the Predictor's contract result
  (``../shared/DATA_CONTRACT.md``), whose ``image`` is the folder the series' files were read from;
- :class:`AnatomyBoxSegWriterOperator` writes a binary DICOM SEG (highdicom), one segment per anatomy
  with P(present) >= 0.5, each segment the anatomy's ``box_voxel`` drawn on the source frames (frames
  = the source instances sorted along the slice normal, as the Predictor indexes them), referencing
  the source series; ``<out>/<SOPInstanceUID>.dcm``. No SEG when no anatomy is present;
- the SDK's ``DICOMTextSRWriterOperator`` writes the report text and the research-use notice as a
  Basic Text SR in the source study; ``<out>/<SOPInstanceUID>.dcm``.

An input without a CT series stops the app with a :class:`DeployInputError` naming the input folder
and the series it holds (exit code 1 from :func:`main`).
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from pydicom.uid import generate_uid

from monai.deploy.conditions import CountCondition
from monai.deploy.core import Application, ConditionType, Fragment, Operator, OperatorSpec
from monai.deploy.core.domain.dicom_series import DICOMSeries
from monai.deploy.core.domain.dicom_series_selection import SelectedSeries, StudySelectedSeries
from monai.deploy.core.domain.dicom_study import DICOMStudy
from monai.deploy.exceptions import ItemNotExistsError
from monai.deploy.operators.dicom_data_loader_operator import DICOMDataLoaderOperator
from monai.deploy.operators.dicom_series_selector_operator import DICOMSeriesSelectorOperator
from monai.deploy.operators.dicom_text_sr_writer_operator import DICOMTextSRWriterOperator
from monai.deploy.operators.dicom_utils import EquipmentInfo, ModelInfo

from anatomy_vlp_bundle import __version__ as BUNDLE_VERSION
from anatomy_vlp_bundle.data.readers import ImageReadError
from anatomy_vlp_bundle.inference import Predictor

__all__ = [
    "CT_SELECTION_RULES",
    "AnatomyBoxSegWriterOperator",
    "AnatomyVLPDeployApp",
    "AnatomyVLPInferenceOperator",
    "DeployInputError",
    "SeriesPrediction",
    "anatomy_code",
    "box_segmentation",
    "main",
    "order_along_slice_axis",
    "resolve_model_file",
]

logger = logging.getLogger(__name__)

#: ``DICOMSeriesSelectorOperator`` rules: every series whose Modality is CT (anchored: ``RTSTRUCT``
#: contains "CT" too). With ``all_matched=True, sort_by_sop_instance_count=True`` the selector lists
#: them, most instances first.
CT_SELECTION_RULES = json.dumps({"selections": [{"name": "CT series", "conditions": {"Modality": "(?i)^CT$"}}]})

APP_NAME = "anatomy_vlp_bundle"
PRESENCE_THRESHOLD = 0.5  # the Predictor's report calls an anatomy "not identified" below this


class DeployInputError(ValueError):
    """The app's input cannot be analysed; the message names the input and the problem."""


@dataclass
class SeriesPrediction:
    """What the inference operator hands to the writers.

    ``result``: the contract result (as written to ``result.json``); ``series``: the analysed series;
    ``frames``: its image instances in the Predictor's slice order (frame ``k`` = voxel index ``k``
    of ``box_voxel``); ``input_shape``: ``[columns, rows, slices]`` of the volume the Predictor read.
    """

    result: dict[str, Any]
    series: DICOMSeries
    frames: list[Any]
    input_shape: list[int]


# --------------------------------------------------------------------------------------------- helpers
def resolve_model_file(path: str | Path) -> Path:
    """The model file for ``-m`` / ``HOLOSCAN_MODEL_PATH``: the file itself, or the one ``*.ts`` file in a
    folder (a MONAI Application Package holds ``/opt/holoscan/models/<name>/model.ts``)."""
    path = Path(path)
    if path.is_file():
        return path
    if path.is_dir():
        found = sorted(p for p in path.rglob("*.ts") if p.is_file())
        if len(found) == 1:
            return found[0]
        if not found:
            raise FileNotFoundError(f"model folder {path}: holds no TorchScript model (*.ts)")
        names = ", ".join(str(p) for p in found)
        raise DeployInputError(f"model folder {path}: holds {len(found)} models ({names}); pass one with -m")
    raise FileNotFoundError(f"model {path} does not exist (set -m/--model or HOLOSCAN_MODEL_PATH)")


def order_along_slice_axis(datasets: Sequence[Any], affine: np.ndarray, shape: Sequence[int]) -> list[Any]:
    """The image instances of a series in the order of voxel index ``k`` of the volume the Predictor read
    (ITK's order: along the slice normal), found from each instance's ``ImagePositionPatient``.

    Args:
        datasets: pydicom datasets of the series' image instances (any order).
        affine: ``(4, 4)`` RAS affine of that volume (``Prediction.input_affine``).
        shape: ``[columns, rows, slices]`` (``Prediction.input_shape``).

    Raises:
        DeployInputError: the instances do not make up that volume (count, size, two at one position).
    """
    cols, rows, slices = (int(s) for s in shape)
    if len(datasets) != slices:
        raise DeployInputError(f"series has {len(datasets)} image instances but the volume read from it has {slices} slices")
    inv = np.linalg.inv(np.asarray(affine, dtype=np.float64))
    index = []
    for ds in datasets:
        if "ImagePositionPatient" not in ds:
            raise DeployInputError(f"instance {ds.SOPInstanceUID}: no ImagePositionPatient")
        if int(ds.Rows) != rows or int(ds.Columns) != cols:
            raise DeployInputError(f"instance {ds.SOPInstanceUID}: {ds.Rows} x {ds.Columns} pixels, the volume has {rows} x {cols}")
        x, y, z = (float(v) for v in ds.ImagePositionPatient)  # DICOM LPS -> RAS
        index.append((inv @ np.array([-x, -y, z, 1.0]))[:3])
    index = np.asarray(index)
    order = np.argsort(index[:, 2], kind="stable")
    k = index[order, 2]
    if slices > 1 and np.min(np.diff(k)) < 1e-3:
        raise DeployInputError("series has two image instances at the same slice position")
    if np.abs(k - np.arange(slices)).max() > 0.01 or np.abs(index[:, :2]).max() > 0.01:
        logger.warning("slice positions deviate from a regular grid (irregular spacing or tilt): frames follow the "
                       "instances' order along the slice normal")
    return [datasets[i] for i in order]


def box_segmentation(result: dict[str, Any], shape: Sequence[int],
                     presence_threshold: float = PRESENCE_THRESHOLD) -> tuple[np.ndarray, list[str]]:
    """The present anatomies' boxes as a binary segmentation on the source frames.

    Args:
        result: a CT contract result (``anatomies`` -> ``present``, ``box_voxel`` ``[i0, j0, k0, i1, j1, k1]``).
        shape: ``[columns, rows, slices]`` of the input volume.

    Returns:
        ``(mask, names)``: ``mask`` ``(slices, rows, columns, S)`` bool, frame ``k``, row ``j``, column
        ``i``; ``names`` the ``S`` anatomies (catalog order) with P(present) >= ``presence_threshold``
        and a non-empty box.
    """
    cols, rows, slices = (int(s) for s in shape)
    boxes: list[tuple[str, list[int]]] = []
    for name, entry in result["anatomies"].items():
        if entry["present"] < presence_threshold:
            continue
        i0, j0, k0, i1, j1, k1 = (int(v) for v in entry["box_voxel"])
        if i1 <= i0 or j1 <= j0 or k1 <= k0:
            logger.warning("anatomy %r: present (%.2f) but its box lies outside the image; no segment", name, entry["present"])
            continue
        boxes.append((name, [i0, j0, k0, i1, j1, k1]))
    mask = np.zeros((slices, rows, cols, len(boxes)), dtype=bool)
    for s, (_, (i0, j0, k0, i1, j1, k1)) in enumerate(boxes):
        mask[k0:k1, j0:j1, i0:i1, s] = True
    return mask, [name for name, _ in boxes]


# anatomy names of the bundle's catalogs that are not SNOMED CT keywords of pydicom's code dictionary
_SCT_ALIASES = {"vertebrae": "Spine", "thyroid gland": "Thyroid", "small bowel": "SmallIntestine", "urinary bladder": "Bladder"}


def anatomy_code(name: str):
    """``(property type, laterality or None)`` SNOMED CT codes for an anatomy name.

    The organ's own code where pydicom's DICOM code dictionary has it (``liver`` -> 10200004 Liver,
    ``right kidney`` -> 64033007 Kidney with the modifier 24028007 Right); otherwise SCT 91723000
    "Anatomical Structure" with the anatomy name as its meaning.
    """
    from pydicom.sr.codedict import codes
    from pydicom.sr.coding import Code

    words = name.strip().lower()
    laterality = None
    for side in ("right", "left"):
        if words.startswith(side + " "):
            laterality = getattr(codes.SCT, side.capitalize())
            words = words[len(side) + 1:]
    keyword = _SCT_ALIASES.get(words) or "".join(w.capitalize() for w in words.split())
    for candidate in (keyword, keyword[:-1] if keyword.endswith("s") else None):
        if not candidate:
            continue
        try:
            return getattr(codes.SCT, candidate), laterality
        except AttributeError:
            continue
    return Code("91723000", "SCT", name), None


def _source_folder(datasets: Sequence[Any], fallback: Path) -> Path:
    files = [getattr(ds, "filename", None) for ds in datasets]
    if files and all(isinstance(f, str) and f for f in files):
        return Path(os.path.commonpath([str(Path(f).resolve().parent) for f in files]))
    return fallback


def _stage_instances(datasets: Sequence[Any], folder: Path) -> None:
    """The series' files, byte for byte, in ``folder`` (datasets without a file are written by pydicom)."""
    for n, ds in enumerate(datasets):
        target = folder / f"{n:06d}.dcm"
        src = getattr(ds, "filename", None)
        if isinstance(src, str) and Path(src).is_file():
            shutil.copyfile(src, target)
        else:
            ds.save_as(str(target))


def _series_summary(studies: Sequence[DICOMStudy]) -> str:
    parts = []
    for study in studies or []:
        for series in study.get_all_series():
            desc = getattr(series, "SeriesDescription", "") or ""
            parts.append(f"{getattr(series, 'Modality', '') or '?'} series {series.SeriesInstanceUID}"
                         f"{f' ({desc!r})' if desc else ''}, {len(series.get_sop_instances())} instances")
    return "; ".join(parts) or "no series"


# --------------------------------------------------------------------------------------------- operators
class AnatomyVLPInferenceOperator(Operator):
    """Runs the bundle's :class:`~anatomy_vlp_bundle.inference.Predictor` on the selected CT series.

    Named inputs:
        dicom_study_list: ``List[DICOMStudy]`` from the loader (named in the error when nothing was selected).
        study_selected_series_list: ``List[StudySelectedSeries]`` from the series selector.

    Named outputs (receivers optional):
        prediction: a :class:`SeriesPrediction`.
        report: the report text and the research-use notice (for ``DICOMTextSRWriterOperator``).
        study_selected_series_list: the analysed series alone (for the SR writer's study attributes).

    File output:
        ``<output_folder>/result.json``: the Predictor's contract result; ``image`` is the folder the
        series' files were read from.

    Args:
        fragment: the application.
        predictor: a loaded CT :class:`~anatomy_vlp_bundle.inference.Predictor`.
        input_folder: the app's input (named in error messages).
        output_folder: where ``result.json`` goes.
        workdir: parent of the temporary series folder (None: the system's temporary folder).
    """

    RESULT_FILE = "result.json"

    def __init__(self, fragment: Fragment, *args, predictor: Predictor, input_folder: Path, output_folder: Path,
                 workdir: Optional[Path] = None, **kwargs) -> None:
        self.predictor = predictor
        self.input_folder = Path(input_folder)
        self.output_folder = Path(output_folder)
        self.workdir = Path(workdir) if workdir else None
        self.input_name_studies = "dicom_study_list"
        self.input_name_selected = "study_selected_series_list"
        self.output_name_prediction = "prediction"
        self.output_name_report = "report"
        self.output_name_selected = "study_selected_series_list"
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input(self.input_name_studies)
        spec.input(self.input_name_selected)
        spec.output(self.output_name_prediction).condition(ConditionType.NONE)
        spec.output(self.output_name_report).condition(ConditionType.NONE)
        spec.output(self.output_name_selected).condition(ConditionType.NONE)

    def compute(self, op_input, op_output, context) -> None:
        studies = op_input.receive(self.input_name_studies)
        selected = op_input.receive(self.input_name_selected)
        study, series = self.choose_series(selected, studies)
        prediction = self.predict_series(series)
        self.output_folder.mkdir(parents=True, exist_ok=True)
        out = self.output_folder / self.RESULT_FILE
        out.write_text(json.dumps(prediction.result, indent=2))
        logger.info("contract result written to %s", out)
        chosen = StudySelectedSeries(study)
        chosen.add_selected_series(SelectedSeries("CT series", series, None))
        op_output.emit(prediction, self.output_name_prediction)
        op_output.emit(f"{prediction.result['report']}\n\n{prediction.result['notice']}", self.output_name_report)
        op_output.emit([chosen], self.output_name_selected)

    def choose_series(self, selected: Sequence[StudySelectedSeries], studies: Sequence[DICOMStudy]) -> tuple[DICOMStudy, DICOMSeries]:
        """The selected series with the most instances (over all studies); :class:`DeployInputError` if none."""
        candidates = [(s.study, sel.series) for s in selected or [] for sel in s.selected_series]
        if not candidates:
            raise DeployInputError(f"{self.input_folder}: no CT series to analyse (found: {_series_summary(studies)})")
        if len({id(study) for study, _ in candidates}) > 1:
            logger.warning("%s: CT series of several studies; analysing the largest series only", self.input_folder)
        study, series = max(candidates, key=lambda c: len(c[1].get_sop_instances()))  # first of equals: selector order
        logger.info("analysing CT series %s (%d instances)", series.SeriesInstanceUID, len(series.get_sop_instances()))
        return study, series

    def predict_series(self, series: DICOMSeries) -> SeriesPrediction:
        """Predict on one series through a temporary copy of its files (the bundle's own DICOM reading)."""
        images = [sop.get_native_sop_instance() for sop in series.get_sop_instances()]
        images = [ds for ds in images if "PixelData" in ds]
        if not images:
            raise DeployInputError(f"{self.input_folder}: CT series {series.SeriesInstanceUID} holds no image instances")
        with tempfile.TemporaryDirectory(prefix="anatomy_vlp_series_", dir=self.workdir) as tmp:
            _stage_instances(images, Path(tmp))
            try:
                pred = self.predictor.predict(tmp)
            except ImageReadError as e:
                raise DeployInputError(f"{self.input_folder}: CT series {series.SeriesInstanceUID} cannot be read: {e}") from e
        result = dict(pred.result)
        result["image"] = str(_source_folder(images, self.input_folder))
        try:
            frames = order_along_slice_axis(images, pred.input_affine, pred.input_shape)
        except DeployInputError as e:
            raise DeployInputError(f"{self.input_folder}: CT series {series.SeriesInstanceUID}: {e}") from e
        return SeriesPrediction(result=result, series=series, frames=frames, input_shape=list(pred.input_shape))


class AnatomyBoxSegWriterOperator(Operator):
    """Writes the present anatomies' boxes as a binary DICOM SEG referencing the source series (highdicom).

    Named input:
        prediction: a :class:`SeriesPrediction`.

    File output:
        ``<output_folder>/<SOPInstanceUID>.dcm``; one segment per anatomy with P(present) >=
        ``presence_threshold`` (catalog order, label = anatomy name, category SCT "Anatomical
        Structure", type from :func:`anatomy_code`); frames only where a box is (empty frames omitted).
        Nothing is written when no anatomy is present.

    Args:
        fragment: the application.
        output_folder: where the SEG goes.
        model_version: the model's version (segment algorithm version).
        presence_threshold: P(present) from which an anatomy gets a segment.
    """

    DCM_EXTENSION = ".dcm"

    def __init__(self, fragment: Fragment, *args, output_folder: Path, model_version: str = "",
                 presence_threshold: float = PRESENCE_THRESHOLD, **kwargs) -> None:
        self.output_folder = Path(output_folder)
        self.model_version = model_version or BUNDLE_VERSION
        self.presence_threshold = float(presence_threshold)
        self.input_name = "prediction"
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input(self.input_name)

    def compute(self, op_input, op_output, context) -> None:
        prediction = op_input.receive(self.input_name)
        path = self.write(prediction, self.output_folder)
        if path is not None:
            logger.info("DICOM SEG written to %s", path)

    def write(self, prediction: SeriesPrediction, output_folder: Path) -> Optional[Path]:
        """Build and save the SEG; returns its path (None when no anatomy is present)."""
        import highdicom as hd
        from pydicom.sr.codedict import codes

        mask, names = box_segmentation(prediction.result, prediction.input_shape, self.presence_threshold)
        if not names:
            logger.warning("no anatomy with P(present) >= %.2f: no DICOM SEG written", self.presence_threshold)
            return None
        algorithm = hd.AlgorithmIdentificationSequence(
            name=APP_NAME, family=codes.cid7162.ArtificialIntelligence, version=str(self.model_version)[:64]
        )
        descriptions = []
        for number, name in enumerate(names, start=1):
            prop_type, laterality = anatomy_code(name)
            desc = hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=name[:64],
                segmented_property_category=codes.SCT.AnatomicalStructure,
                segmented_property_type=prop_type,
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=algorithm,
            )
            if laterality is not None:
                desc.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
                    hd.sr.CodedConcept(laterality.value, laterality.scheme_designator, laterality.meaning)
                ]
            descriptions.append(desc)
        uid = hd.UID()
        seg = hd.seg.Segmentation(
            source_images=prediction.frames,
            pixel_array=mask,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions,
            series_instance_uid=hd.UID(),
            series_number=_next_series_number(prediction.frames),
            sop_instance_uid=uid,
            instance_number=1,
            manufacturer=APP_NAME,
            manufacturer_model_name=f"{APP_NAME} MONAI Deploy app",
            software_versions=str(BUNDLE_VERSION),
            device_serial_number="0000",
            content_label="ANATOMYBOXES",
            content_description="Anatomy bounding boxes. Research use only.",
            series_description="anatomy_vlp anatomy boxes (research use only)",
        )
        now = datetime.datetime.now()
        seg.SeriesDate = now.strftime("%Y%m%d")
        seg.SeriesTime = now.strftime("%H%M%S")
        output_folder.mkdir(parents=True, exist_ok=True)
        path = output_folder / f"{uid}{self.DCM_EXTENSION}"
        seg.save_as(str(path))
        return path


def _next_series_number(frames: Sequence[Any]) -> int:
    """A series number after the source's (derived series conventionally follow their source)."""
    try:
        return int(frames[0].SeriesNumber) + 1000
    except (AttributeError, TypeError, ValueError):
        return 1000


# --------------------------------------------------------------------------------------------- application
class AnatomyVLPDeployApp(Application):
    """DICOM CT series -> ``result.json`` + DICOM SEG (anatomy boxes) + Basic Text SR (report).

    Args:
        argv: command line (``[python, program, -i, ..., -o, ..., -m, ...]``); None: ``sys.argv``.
        selection_rules: ``DICOMSeriesSelectorOperator`` rules (default :data:`CT_SELECTION_RULES`).
        write_sr: also write the report as a Basic Text SR.
    """

    def __init__(self, *args, selection_rules: str = CT_SELECTION_RULES, write_sr: bool = True, **kwargs) -> None:
        self.selection_rules = selection_rules
        self.write_sr = write_sr
        super().__init__(*args, **kwargs)

    def compose(self) -> None:
        app_context = Application.init_app_context(self.argv)
        input_path = Path(app_context.input_path).absolute()
        output_path = Path(app_context.output_path).absolute()
        if not input_path.is_dir():
            raise DeployInputError(
                f"input folder {input_path} does not exist or is not a folder (set -i/--input or HOLOSCAN_INPUT_PATH)"
            )
        output_path.mkdir(parents=True, exist_ok=True)
        model_file = resolve_model_file(app_context.model_path)
        predictor = Predictor.load(model_file, device="cuda" if torch.cuda.is_available() else "cpu")
        catalog = predictor.catalog
        if catalog.modality != "CT":
            raise DeployInputError(f"model {model_file}: catalog {catalog.name!r} is {catalog.modality}; this app analyses CT series")
        logger.info("model %s: catalog %s, version %s, on %s", model_file, catalog.name, predictor.version or "?", predictor.device)
        workdir = Path(app_context.workdir) if app_context.workdir else None

        loader = DICOMDataLoaderOperator(self, CountCondition(self, 1), input_folder=input_path, name="dicom_loader")
        selector = DICOMSeriesSelectorOperator(
            self, rules=self.selection_rules, all_matched=True, sort_by_sop_instance_count=True, name="ct_series_selector"
        )
        infer = AnatomyVLPInferenceOperator(
            self, predictor=predictor, input_folder=input_path, output_folder=output_path, workdir=workdir, name="anatomy_vlp_inference"
        )
        seg_writer = AnatomyBoxSegWriterOperator(
            self, output_folder=output_path, model_version=predictor.version, name="anatomy_box_seg_writer"
        )
        self.add_flow(loader, selector, {("dicom_study_list", "dicom_study_list")})
        self.add_flow(loader, infer, {("dicom_study_list", "dicom_study_list")})
        self.add_flow(selector, infer, {("study_selected_series_list", "study_selected_series_list")})
        self.add_flow(infer, seg_writer, {("prediction", "prediction")})
        if self.write_sr:
            # Device UID derived from the model file's hash: the same model always has the same UID
            model_info = ModelInfo(creator=APP_NAME, name=f"{APP_NAME} {catalog.name}", version=predictor.version or BUNDLE_VERSION,
                                   uid=generate_uid(entropy_srcs=[predictor.sha256]))
            sr_writer = DICOMTextSRWriterOperator(
                self,
                output_folder=output_path,
                model_info=model_info,
                copy_tags=True,
                equipment_info=EquipmentInfo(manufacturer=APP_NAME, manufacturer_model=f"{APP_NAME} MONAI Deploy app",
                                             software_version_number=BUNDLE_VERSION),
                custom_tags={"SeriesDescription": "anatomy_vlp report (research use only)"},
                name="report_sr_writer",
            )
            self.add_flow(infer, sr_writer, {("report", "text"), ("study_selected_series_list", "study_selected_series_list")})


def main(argv: Optional[list[str]] = None) -> int:
    """Run the app; input problems are reported in one line and give exit code 1."""
    try:
        AnatomyVLPDeployApp(argv).run()
    except (DeployInputError, ImageReadError, ItemNotExistsError, FileNotFoundError) as e:
        print(f"anatomy_vlp deploy app: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
