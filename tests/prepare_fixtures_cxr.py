"""Tiny chest X-ray datasets in their published layouts, for the converter tests.

Each builder writes a handful of small images (gradients, so that deep validation sees real pixel
data) plus the source's own files, with the real file names, folder layout and column names:

- :func:`build_imagenome`: Chest ImaGenome ``silver_dataset/`` (scene graphs, split CSVs, gold list) next
  to a MIMIC-CXR-JPG ``files/`` tree with ``mimic-cxr-2.0.0-metadata.csv`` and MIMIC-CXR report texts.
- :func:`build_iu_openi` / :func:`build_iu_kaggle`: IU X-ray as NLM's ``ecgen-radiology/*.xml`` +
  ``NLMCXR_png/`` and as Kaggle's ``indiana_reports.csv`` + ``indiana_projections.csv`` + ``images/images_normalized/``.
- :func:`build_chexpert`: ``CheXpert-v1.0-small/train.csv``, ``valid.csv`` and the JPGs.
- :func:`build_nih`: ``Data_Entry_2017_v2020.csv``, ``train_val_list.txt``, ``test_list.txt``,
  ``images_NNN/images/*.png`` and ``BBox_List_2017.csv``.

Every builder returns a dict of the paths and of what the tests expect.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["write_image", "build_imagenome", "build_iu_openi", "build_iu_kaggle", "build_chexpert", "build_nih"]


def write_image(path: Path, width: int, height: int) -> Path:
    """A ``width`` x ``height`` 8-bit gray gradient as PNG or JPEG (by suffix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    y, x = np.mgrid[0:height, 0:width]
    Image.fromarray(((x * 3 + y * 2) % 256).astype(np.uint8), mode="L").save(path)
    return path


def _write_csv(path: Path, header: list[str], rows: list[list], trailing_comma: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(header + ([""] if trailing_comma else []))
        for row in rows:
            w.writerow(list(row) + ([""] if trailing_comma else []))
    return path


# ------------------------------------------------------------------------------------------ ImaGenome
def _dicom_id(i: int) -> str:
    return f"{i:08x}-bde0afdd-112c0b34-7bc16630-4e384014"


def _object(bbox_name: str, box: tuple[float, float, float, float], dicom: str) -> dict:
    """One scene-graph object: 224-grid coordinates (not used by the converter) and ``original_*`` pixels."""
    x1, y1, x2, y2 = box
    return {
        "object_id": f"{dicom}_{bbox_name}", "x1": 10, "y1": 10, "x2": 50, "y2": 50, "width": 40, "height": 40,
        "bbox_name": bbox_name, "synsets": ["C0000000"], "name": bbox_name.title(),
        "original_x1": x1, "original_y1": y1, "original_x2": x2, "original_y2": y2,
        "original_width": x2 - x1, "original_height": y2 - y1,
    }


def _attribute(bbox_name: str, dicom: str, phrases: list[str], labels: list[list[str]]) -> dict:
    """One scene-graph attribute entry: per phrase its ``category|yes/no|name`` list."""
    return {
        "name": bbox_name.title(), "bbox_name": bbox_name, bbox_name: True, "synsets": ["C0000000"],
        "object_id": f"{dicom}_{bbox_name}",
        "attributes": labels, "attributes_ids": [["CL000000"] * len(x) for x in labels],
        "phrases": phrases, "phrase_IDs": [f"{dicom}|{i}" for i in range(len(phrases))],
        "sections": ["finalreport"] * len(phrases), "comparison_cues": [[] for _ in phrases],
        "temporal_cues": [[] for _ in phrases], "severity_cues": [[] for _ in phrases],
        "texture_cues": [[] for _ in phrases],
    }


def _scene_graph(dicom: str, subject: str, study: str, objects: list[dict], attributes: list[dict]) -> dict:
    return {
        "image_id": dicom, "viewpoint": "PA", "patient_id": int(subject), "study_id": int(study),
        "gender": "F", "age_decile": "60-70", "reason_for_exam": "___F with cough",
        "StudyOrder": 1, "StudyDateTime": "2180-05-06 21:00:00",
        "objects": objects, "attributes": attributes, "relationships": [],
    }


def build_imagenome(root: Path) -> dict:
    """Chest ImaGenome 1.0.0 + MIMIC-CXR-JPG 2.0.0 + MIMIC-CXR reports under ``root``.

    Images (subject, split):
      - ``full`` (10000032, train): 64x80 JPG at its DICOM size; spine box taller than the image
        (clipped), a right clavicle box left of the image (dropped), a ``left cardiac silhouette`` box
        (not in the catalog); labels on four regions.
      - ``small`` (10000032, train, another study): 32x40 JPG of a 64x80 DICOM (downscaled copy):
        boxes rescaled by 0.5.
      - ``valid`` (10000764, valid), ``test`` (10000898, test).
      - ``gold`` (10001217, test): in ``images_to_avoid.csv``, left out.
      - skipped: ``no_image`` (JPG absent), ``bad_json`` (truncated scene graph), ``no_graph``
        (no scene graph), ``no_meta`` (32x40 JPG without metadata row, boxes for 64x80).
    """
    ig = root / "chest-imagenome-dataset-1.0.0"
    mimic = root / "mimic-cxr-jpg-2.0.0"
    reports = root / "mimic-cxr-reports"
    graphs = ig / "silver_dataset" / "scene_graph"
    graphs.mkdir(parents=True)
    spec = {  # key: (dicom index, subject, study, split, jpg size, DICOM size in the metadata or None)
        "full": (1, "10000032", "50414267", "train", (64, 80), (64, 80)),
        "small": (2, "10000032", "53189527", "train", (32, 40), (64, 80)),
        "valid": (3, "10000764", "57375967", "valid", (64, 64), (64, 64)),
        "test": (4, "10000898", "50771383", "test", (64, 64), (64, 64)),
        "gold": (5, "10001217", "58913004", "test", (64, 64), (64, 64)),
        "no_image": (6, "10001122", "51265524", "train", None, (64, 64)),
        "bad_json": (7, "10001176", "53186264", "train", (64, 64), (64, 64)),
        "no_graph": (8, "10001401", "56591850", "train", (64, 64), (64, 64)),
        "no_meta": (9, "10001884", "52201331", "train", (32, 40), None),
    }
    ids = {k: _dicom_id(v[0]) for k, v in spec.items()}
    rel_path = {k: f"files/p{v[1][:2]}/p{v[1]}/s{v[2]}/{ids[k]}.dcm" for k, v in spec.items()}
    for key, (_, subject, study, split, jpg, _) in spec.items():
        if jpg is not None:
            write_image(mimic / Path(rel_path[key]).with_suffix(".jpg"), *jpg)

    lung_boxes = [_object("right lung", (5, 10, 30, 70), "x"), _object("left lung", (34, 10, 60, 70), "x"),
                  _object("cardiac silhouette", (20, 40, 50, 75), "x")]
    full_d = ids["full"]
    full_graph = _scene_graph(full_d, "10000032", "50414267", [
        _object("right lung", (5, 10, 30, 70), full_d),
        _object("left lung", (34, 10, 60, 70), full_d),
        _object("cardiac silhouette", (20, 40, 50, 75), full_d),
        _object("spine", (28, 0, 36, 95), full_d),
        _object("right clavicle", (-20, 5, -5, 12), full_d),
        _object("left cardiac silhouette", (35, 40, 50, 75), full_d),
    ], [
        _attribute("right lung", full_d, ["Right lower lobe opacity,  likely atelectasis."],
                   [["anatomicalfinding|yes|lung opacity", "anatomicalfinding|yes|linear/patchy atelectasis",
                     "nlp|yes|abnormal", "temporal|yes|new"]]),
        _attribute("left lung", full_d, ["No left pneumothorax or effusion.", "Low lung volumes."],
                   [["anatomicalfinding|no|pneumothorax", "anatomicalfinding|no|pleural effusion",
                     "anatomicalfinding|no|hydropneumothorax", "nlp|yes|normal"],
                    ["technicalassessment|yes|low lung volumes"]]),
        _attribute("cardiac silhouette", full_d, ["The heart is mildly enlarged."],
                   [["anatomicalfinding|yes|enlarged cardiac silhouette", "severity|yes|mild",
                     "anatomicalfinding|no|pleural effusion"]]),
        _attribute("trachea", full_d, ["Endotracheal tube terminates 4 cm above the carina."],
                   [["tubesandlines|yes|endotracheal tube"]]),
        _attribute("left breast", full_d, ["Left breast shadow."], [["technicalassessment|yes|breast/nipple shadows"]]),
    ])
    graphs_of = {"full": full_graph}
    for key in ("small", "valid", "test", "gold", "no_image", "no_meta"):
        d = ids[key]
        _, subject, study, *_ = spec[key]
        graphs_of[key] = _scene_graph(d, subject, study, [dict(o, object_id=f"{d}_{o['bbox_name']}") for o in lung_boxes], [
            _attribute("cardiac silhouette", d, ["Heart size is normal."], [["anatomicalfinding|no|enlarged cardiac silhouette"]]),
        ])
    for key, graph in graphs_of.items():
        (graphs / f"{ids[key]}_SceneGraph.json").write_text(json.dumps(graph, indent=1), encoding="utf-8")
    (graphs / f"{ids['bad_json']}_SceneGraph.json").write_text('{"image_id": "x", "objects": [{"bbox_name": ', encoding="utf-8")

    splits = ig / "silver_dataset" / "splits"
    header = ["", "subject_id", "study_id", "dicom_id", "path", "ViewPosition"]
    for split in ("train", "valid", "test"):
        rows = [[i, spec[k][1], spec[k][2], ids[k], rel_path[k], "PA"] for i, k in enumerate(spec) if spec[k][3] == split]
        _write_csv(splits / f"{split}.csv", header, rows)
    _write_csv(splits / "images_to_avoid.csv", ["subject_id", "study_id", "dicom_id", "path", "ViewPosition"],
               [[spec["gold"][1], spec["gold"][2], ids["gold"], rel_path["gold"], "PA"]])
    meta_header = ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition", "Rows",
                   "Columns", "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning",
                   "ViewCodeSequence_CodeMeaning", "PatientOrientationCodeSequence_CodeMeaning"]
    _write_csv(mimic / "mimic-cxr-2.0.0-metadata.csv", meta_header, [
        [ids[k], v[1], v[2], "CHEST (PA AND LAT)", "PA", v[5][1], v[5][0], "21800506", "213014.531",
         "CHEST (PA AND LAT)", "postero-anterior", "Erect"] for k, v in spec.items() if v[5] is not None])
    report = reports / "files" / "p10" / "p10000032" / "s50414267.txt"
    report.parent.mkdir(parents=True)
    report.write_text("                                 FINAL REPORT\n EXAMINATION:  CHEST (PA AND LAT)\n\n"
                      " FINDINGS:  Right lower lobe opacity, likely atelectasis.\n\n IMPRESSION:  Mild cardiomegaly.\n",
                      encoding="utf-8")
    subjects = {k: v[1] for k, v in spec.items()}
    splits_of = {k: {"train": "training", "valid": "validation", "test": "test"}[v[3]] for k, v in spec.items()}
    return {"imagenome": ig, "mimic": mimic, "reports": reports, "ids": ids, "subjects": subjects,
            "splits": splits_of, "report_file": report,
            "jpg": {k: mimic / Path(p).with_suffix(".jpg") for k, p in rel_path.items()}}


# ------------------------------------------------------------------------------------------ IU X-ray
def _openi_xml(uid: str, findings: str | None, impression: str | None, major: list[str], automatic: list[str],
               images: list[str]) -> str:
    sections = "".join(
        f'\n            <AbstractText Label="{label}">{text}</AbstractText>'
        for label, text in (("COMPARISON", "None."), ("INDICATION", "Positive TB test"), ("FINDINGS", findings),
                            ("IMPRESSION", impression)) if text is not None)
    mesh = "".join(f"\n      <major>{t}</major>" for t in major) + "".join(f"\n      <automatic>{t}</automatic>" for t in automatic)
    parents = "".join(f"""
   <parentImage id="{i}">
      <figureId>F{n + 1}</figureId>
      <caption>Xray Chest PA and Lateral</caption>
      <panel type="single">
         <url>/hadoop/storage/radiology/extract/{i}.jpg</url>
         <imgModality>7</imgModality>
      </panel>
   </parentImage>""" for n, i in enumerate(images))
    return f"""<?xml version="1.0" encoding="utf-8"?>
<eCitation>
   <meta type="rr"/>
   <uId id="{uid}"/>
   <pmcId id="{uid[3:]}"/>
   <docSource>CXR</docSource>
   <IUXRId id="{uid[3:]}"/>
   <licenseType>open-access</licenseType>
   <articleDate>2013-08-01</articleDate>
   <articleType>XR</articleType>
   <publisher>Indiana University</publisher>
   <title>Indiana University Chest X-ray Collection</title>
   <MedlineCitation Owner="Indiana University" Status="supplied by publisher">
      <Article PubModel="Electronic">
         <ArticleTitle>Indiana University Chest X-ray Collection</ArticleTitle>
         <Abstract>{sections}
         </Abstract>
      </Article>
   </MedlineCitation>
   <MeSH>{mesh}
   </MeSH>{parents}
</eCitation>
"""


#: IU reports of the fixtures: n -> (findings, impression, major MeSH, automatic MeSH, [(Open-i image id, projection)]).
IU_REPORTS: dict[int, tuple] = {
    1: ("The cardiac silhouette and mediastinum size are within normal limits. There is no pulmonary edema.",
        "Normal chest x-XXXX.", ["normal"], [],
        [("CXR1_1_IM-0001-3001", "Frontal"), ("CXR1_1_IM-0001-4001", "Lateral")]),
    2: ("Borderline cardiomegaly. Left basilar opacity. Small bilateral effusions.", "No acute pulmonary findings.",
        ["Cardiomegaly/borderline", "Opacity/lung/base/left", "Pleural Effusion/bilateral/small", "Pulmonary Atelectasis",
         "Calcified Granuloma/lung/upper lobe/right"], ["pneumonia"],
        [("CXR2_IM-0652-1001", "Frontal"), ("CXR2_IM-0652-2001", "Lateral")]),
    5: ("Heart size normal.", "No acute disease.", ["normal"], [], [("CXR5_IM-2117-1001", "Frontal")]),
    6: (None, "", ["normal"], [], [("CXR6_IM-2192-1001", "Frontal")]),
}
IU_NORMAL_UIDS = tuple(range(7, 15))


def _iu_images_of(n: int) -> list[tuple[str, str]]:
    return IU_REPORTS[n][4] if n in IU_REPORTS else [(f"CXR{n}_IM-{2200 + n:04d}-1001", "Frontal")]


def _kaggle_name(openi_id: str) -> str:
    """``CXR1_1_IM-0001-3001`` / ``CXR2_IM-0652-1001`` -> ``1_IM-0001-3001.dcm.png`` / ``2_IM-0652-1001.dcm.png``."""
    n, rest = openi_id[3:].split("_", 1)
    return f"{rest if rest.startswith(n + '_') else n + '_' + rest}.dcm.png"


def build_iu_openi(root: Path, projections: bool = True) -> dict:
    """NLM's Open-i layout: ``ecgen-radiology/<n>.xml`` and ``NLMCXR_png/<image id>.png``.

    Reports 1 (normal; frontal + lateral), 2 (findings; frontal + lateral), 3 (malformed XML), 4 (no
    parentImage), 5 (its PNG missing), 6 (no report text), 7-14 (normal, one frontal each). With
    ``projections``, Kaggle's ``indiana_projections.csv`` is in the folder too (it gives the views).
    """
    reports, pngs = root / "ecgen-radiology", root / "NLMCXR_png"
    reports.mkdir(parents=True)
    for n in [*IU_REPORTS, *IU_NORMAL_UIDS]:
        if n in IU_REPORTS:
            findings, impression, major, automatic, images = IU_REPORTS[n]
        else:
            findings, impression, major, automatic, images = ("The lungs are clear.", "No acute cardiopulmonary process.",
                                                              ["normal"], [], _iu_images_of(n))
        (reports / f"{n}.xml").write_text(_openi_xml(f"CXR{n}", findings, impression, major, automatic,
                                                     [i for i, _ in images]), encoding="utf-8")
        for image_id, _ in images:
            if n != 5:
                write_image(pngs / f"{image_id}.png", 48, 48)
    (reports / "3.xml").write_text('<?xml version="1.0" encoding="utf-8"?>\n<eCitation>\n   <uId id="CXR3"/>\n   <MeSH><major>normal',
                                   encoding="utf-8")
    (reports / "4.xml").write_text(_openi_xml("CXR4", "Clear lungs.", "Normal.", ["normal"], [], []), encoding="utf-8")
    if projections:
        _write_csv(root / "indiana_projections.csv", ["uid", "filename", "projection"], [
            [n, _kaggle_name(i), view] for n in [*IU_REPORTS, *IU_NORMAL_UIDS] for i, view in _iu_images_of(n)])
    return {"root": root, "reports": reports, "images": pngs}


def build_iu_kaggle(root: Path) -> dict:
    """Kaggle's layout: ``indiana_reports.csv``, ``indiana_projections.csv``, ``images/images_normalized/*.dcm.png``.

    uids 1, 2, 7-14 as in :func:`build_iu_openi`; uid 5's image file is missing; uid 99 is in the
    projections but not in the reports.
    """
    images = root / "images" / "images_normalized"
    uids = [1, 2, 5, *IU_NORMAL_UIDS]
    report_rows, projection_rows = [], []
    for n in uids:
        if n in IU_REPORTS:
            findings, impression, major, _, views = IU_REPORTS[n]
        else:
            findings, impression, major, views = "The lungs are clear.", "No acute cardiopulmonary process.", ["normal"], _iu_images_of(n)
        problems = ";".join(dict.fromkeys(t.split("/")[0] for t in major))
        report_rows.append([n, ";".join(major), problems, "Xray Chest PA and Lateral", "Positive TB test", "None.",
                            findings, impression])
        for image_id, view in views:
            name = _kaggle_name(image_id)
            projection_rows.append([n, name, view])
            if n != 5:
                write_image(images / name, 48, 48)
    projection_rows.append([99, "99_IM-9999-1001.dcm.png", "Frontal"])
    write_image(images / "99_IM-9999-1001.dcm.png", 48, 48)
    _write_csv(root / "indiana_reports.csv",
               ["uid", "MeSH", "Problems", "image", "indication", "comparison", "findings", "impression"], report_rows)
    _write_csv(root / "indiana_projections.csv", ["uid", "filename", "projection"], projection_rows)
    return {"root": root, "images": images}


# ------------------------------------------------------------------------------------------ CheXpert
CHEXPERT_LABELS = ["No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
                   "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
                   "Fracture", "Support Devices"]


def build_chexpert(root: Path) -> dict:
    """``CheXpert-v1.0-small/`` with train.csv (patients 1-6) and valid.csv (patients 64541-64542).

    patient00001/study1: frontal (Cardiomegaly 1, Edema -1, Lung Opacity blank, Pleural Effusion 0, Support
    Devices 1) + lateral; patient00002/study1 frontal 'No Finding'; patient00003's image is missing;
    patient00004's Edema cell is malformed ('maybe'); patients 5-6 plain frontal images.
    """
    base = root / "CheXpert-v1.0-small"
    header = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_LABELS]

    def row(path: str, view: str, labels: dict[str, str]) -> list:
        return [f"CheXpert-v1.0-small/{path}", "Female", "68", view, "AP" if view == "Frontal" else ""] + [
            labels.get(label, "") for label in CHEXPERT_LABELS]

    train = [
        row("train/patient00001/study1/view1_frontal.jpg", "Frontal", {"Cardiomegaly": "1.0", "Edema": "-1.0",
                                                                       "Pleural Effusion": "0.0", "Support Devices": "1.0"}),
        row("train/patient00001/study1/view2_lateral.jpg", "Lateral", {"Cardiomegaly": "1.0"}),
        row("train/patient00002/study1/view1_frontal.jpg", "Frontal", {"No Finding": "1.0"}),
        row("train/patient00003/study1/view1_frontal.jpg", "Frontal", {"Pneumothorax": "1.0"}),
        row("train/patient00004/study1/view1_frontal.jpg", "Frontal", {"Edema": "maybe"}),
        row("train/patient00005/study1/view1_frontal.jpg", "Frontal", {"Atelectasis": "1.0"}),
        row("train/patient00005/study2/view1_frontal.jpg", "Frontal", {"Atelectasis": "0.0"}),
        row("train/patient00006/study1/view1_frontal.jpg", "Frontal", {"Fracture": "-1.0"}),
    ]
    all_zero = {label: "0.0" for label in CHEXPERT_LABELS}
    valid = [
        row("valid/patient64541/study1/view1_frontal.jpg", "Frontal", dict(all_zero, Cardiomegaly="1.0")),
        row("valid/patient64542/study1/view1_frontal.jpg", "Frontal", dict(all_zero, **{"No Finding": "1.0"})),
    ]
    _write_csv(base / "train.csv", header, train)
    _write_csv(base / "valid.csv", header, valid)
    for r in train + valid:
        if "patient00003" not in r[0]:
            write_image(root / r[0], 40, 48)
    return {"root": root, "base": base}


# ------------------------------------------------------------------------------------------ NIH
def build_nih(root: Path) -> dict:
    """NIH ChestX-ray14 with 9 images over 6 patients, in ``images_001/images`` and ``images_002/images``.

    00000001_000 'Cardiomegaly', 00000001_001 'Cardiomegaly|Effusion', 00000002_000 'No Finding' (test),
    00000003_000 'Hernia|Pleural_Thickening', 00000004_000 'Atelectasis|Pneumonitis' (unknown label),
    00000005_000 (image missing, test), 00000006_000-002 'No Finding' / 'Mass' / 'Nodule|Infiltration'.
    """
    rows = [
        ["00000001_000.png", "Cardiomegaly", 0, 1, 58, "M", "PA", 2682, 2749, 0.143, 0.143],
        ["00000001_001.png", "Cardiomegaly|Effusion", 1, 1, 58, "M", "PA", 2894, 2729, 0.143, 0.143],
        ["00000002_000.png", "No Finding", 0, 2, 81, "M", "PA", 2500, 2048, 0.171, 0.171],
        ["00000003_000.png", "Hernia|Pleural_Thickening", 0, 3, 74, "F", "PA", 2500, 2048, 0.168, 0.168],
        ["00000004_000.png", "Atelectasis|Pneumonitis", 0, 4, 82, "M", "AP", 2500, 2048, 0.168, 0.168],
        ["00000005_000.png", "Emphysema", 0, 5, 69, "F", "PA", 2048, 2500, 0.168, 0.168],
        ["00000006_000.png", "No Finding", 0, 6, 61, "M", "PA", 2048, 2500, 0.168, 0.168],
        ["00000006_001.png", "Mass", 1, 6, 61, "M", "AP", 3056, 2544, 0.139, 0.139],
        ["00000006_002.png", "Nodule|Infiltration", 2, 6, 61, "M", "AP", 3056, 2544, 0.139, 0.139],
    ]
    _write_csv(root / "Data_Entry_2017_v2020.csv",
               ["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age", "Patient Gender",
                "View Position", "OriginalImage[Width", "Height]", "OriginalImagePixelSpacing[x", "y]"], rows)
    test = {"00000002_000.png", "00000005_000.png"}
    (root / "test_list.txt").write_text("".join(f"{r[0]}\n" for r in rows if r[0] in test), encoding="utf-8")
    (root / "train_val_list.txt").write_text("".join(f"{r[0]}\n" for r in rows if r[0] not in test), encoding="utf-8")
    for i, r in enumerate(rows):
        if r[0] != "00000005_000.png":
            write_image(root / f"images_00{1 + i // 5}" / "images" / r[0], 32, 32)
    _write_csv(root / "BBox_List_2017.csv", ["Image Index", "Finding Label", "Bbox [x", "y", "w", "h]"],
               [["00000001_000.png", "Cardiomegaly", 225.08, 547.02, 86.85, 79.99],
                ["00000006_001.png", "Mass", 500.0, 300.0, 100.0, 90.0]], trailing_comma=True)
    return {"root": root}
