"""The contracts every job shares: JUMP metadata names, channel order, control identities.

Only constants and tiny pure helpers live here, so that ingestion, training and
evaluation agree on names without importing each other.
"""
from __future__ import annotations

# JUMP (cpg0016) metadata column names; output tables keep them so pycytominer and
# copairs users can read them without a mapping step.
SOURCE = "Metadata_Source"
BATCH = "Metadata_Batch"
PLATE = "Metadata_Plate"
PLATE_TYPE = "Metadata_PlateType"
WELL = "Metadata_Well"
SITE = "Metadata_Site"
JCP = "Metadata_JCP2022"
INCHIKEY = "Metadata_InChIKey"
INCHI = "Metadata_InChI"
SMILES = "Metadata_SMILES"
ROLE = "Metadata_Role"

# Roles of a well/site.
TREATED = "treated"
NEGCON = "negcon"
POSCON = "poscon"
EMPTY = "empty"

DMSO = "JCP2022_033924"
EMPTY_WELL = "JCP2022_999999"
# Compound positive controls of the JUMP compound plates (name: JCP2022 id).
POSITIVE_CONTROLS = {
    "AMG900": "JCP2022_037716",
    "dexamethasone": "JCP2022_025848",
    "FK-866": "JCP2022_046054",
    "LY2109761": "JCP2022_035095",
    "NVS-PAK1-1": "JCP2022_064022",
    "quinidine": "JCP2022_050797",
    "TC-S-7004": "JCP2022_012818",
    "aloxistatin": "JCP2022_085227",
}

# The fixed channel order of every shard unless its manifest says otherwise.
CHANNELS = ("DNA", "RNA", "ER", "AGP", "Mito")


def channel_column(channel: str, kind: str = "FileName") -> str:
    """load_data column for a channel: `FileName_OrigDNA`, `PathName_OrigDNA`, `FileName_IllumDNA`..."""
    if kind in ("FileName", "PathName"):
        return f"{kind}_Orig{channel}"
    if kind in ("IllumFileName", "IllumPathName"):
        return f"{kind.replace('Illum', '')}_Illum{channel}"
    raise ValueError(f"unknown load_data column kind {kind!r}")


def role_of(jcp: str, positive_controls=frozenset(POSITIVE_CONTROLS.values())) -> str:
    """Role of a well from its JCP2022 id."""
    if jcp == DMSO:
        return NEGCON
    if jcp == EMPTY_WELL:
        return EMPTY
    if jcp in positive_controls:
        return POSCON
    return TREATED


def well_name(row: int, col: int) -> str:
    """0-based (row, col) -> JUMP well name, e.g. (0, 0) -> 'A01', (15, 23) -> 'P24'."""
    return f"{chr(ord('A') + row)}{col + 1:02d}"


def parse_well(well: str) -> tuple[int, int]:
    """'A01' -> (0, 0); 'AF48' (1536-well) -> (31, 47)."""
    letters = "".join(c for c in well if c.isalpha())
    digits = well[len(letters):]
    row = 0
    for c in letters.upper():
        row = row * 26 + (ord(c) - ord("A") + 1)
    return row - 1, int(digits) - 1
