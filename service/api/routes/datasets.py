"""``/v1/datasets``: register a dataset file (validated, stored by sha256) and read it back."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, Query, UploadFile
from fastapi.responses import JSONResponse, Response

from service.api.deps import Auth, Ctx
from service.api.pagination import paginate, parse_page
from service.api.routes.common import stored_upload
from service.api.schemas import DatasetOut, DatasetPage
from service.api.uploads import check_extension, check_name, check_normalization, parse_json_field, read_dataset
from service.core.repo import blobs, datasets

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])


@router.post("", status_code=201, response_model=DatasetOut, summary="Register a dataset (.npz)")
def create_dataset(ctx: Ctx, caller: Auth, name: Annotated[str, Form()], file: Annotated[UploadFile, File()],
                   mean: Annotated[str | None, Form(description="JSON list, one value per channel")] = None,
                   std: Annotated[str | None, Form(description="JSON list, one value per channel")] = None):
    name = check_name(name)
    check_extension("file", file.filename, ".npz")
    mean_v, std_v = parse_json_field("mean", mean), parse_json_field("std", std)
    with ctx.upload_slot(), stored_upload(ctx, file.file, "file") as upload:
        arrays = read_dataset(upload.staged.path, "file", ctx.settings.max_train_samples,
                              ctx.settings.max_dataset_bytes)
        summary = arrays.summary()
        mean_v, std_v = check_normalization(mean_v, std_v, arrays.input_shape)
        with ctx.db.transaction() as session:
            row = datasets.create(session, caller, name=name, sha256=upload.staged.sha256,
                                  size_bytes=upload.staged.size, summary=summary, ids_train=arrays.ids_train,
                                  mean=mean_v, std=std_v)
            upload.commit()
            body = datasets.render(row)
    return JSONResponse(body, status_code=201, headers={"Location": f"/v1/datasets/{body['id']}"})


@router.get("", response_model=DatasetPage, summary="List datasets")
def list_datasets(ctx: Ctx, caller: Auth, name: str | None = None,
                  max_results: Annotated[int | None, Query()] = None, page_token: str | None = None):
    page = parse_page(page_token, max_results, ctx.settings.page_size, ctx.settings.max_page_size)
    with ctx.db.session() as session:
        return paginate(session, datasets.query(caller, name), datasets.Dataset.id, page, datasets.render)


@router.get("/{dataset_id}", response_model=DatasetOut, summary="Get a dataset")
def get_dataset(ctx: Ctx, caller: Auth, dataset_id: int):
    with ctx.db.session() as session:
        return datasets.render(datasets.get(session, caller, dataset_id))


@router.delete("/{dataset_id}", status_code=204, summary="Delete a dataset that no model uses")
def delete_dataset(ctx: Ctx, caller: Auth, dataset_id: int):
    with ctx.db.transaction() as session:
        digests = datasets.delete(session, caller, dataset_id)
    blobs.prune(ctx.db, ctx.store, digests)  # after the commit: a failed transaction removes nothing
    return Response(status_code=204)
