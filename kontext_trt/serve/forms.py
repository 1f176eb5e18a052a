"""Reading an edit's body: multipart/form-data as it streams in (every part capped while it is read: a file over the
cap is refused with 413 before the rest arrives; nothing spooled to disk; field names and values strict UTF-8), or
a JSON object whose images are base64 data URLs, as OpenAI's JSON edits send them."""
from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, field
from typing import Any, AsyncIterator
from urllib.parse import parse_qsl

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from kontext_trt.serve.openai_api import ApiError, bad_request

MAX_FIELD_BYTES = 64 * 2**10  # any text field; the prompt has its own, smaller cap (Limits.max_prompt_bytes)
MAX_PARTS = 32


@dataclass
class Form:
    """A parsed form: fields in order (text; JSON values from a JSON body), and files as (field name, bytes)."""

    fields: list[tuple[str, Any]] = field(default_factory=list)
    files: list[tuple[str, bytes | bytearray]] = field(default_factory=list)


def decoded(data: bytes, what: str, param: str | None) -> str:
    """Bytes as UTF-8 text, or a 400 naming the byte (no Latin-1 fallback)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise bad_request(f"{what} is not valid UTF-8 text (byte 0x{data[exc.start]:02x} at {exc.start}): send form "
                          "fields in UTF-8", param, "invalid_value") from None


def size_text(size: int) -> str:
    """Bytes as people read them: 32 MiB, 512 KiB, 100 bytes."""
    for unit, scale in (("MiB", 2**20), ("KiB", 2**10)):
        if size >= scale:
            return f"{size / scale:.4g} {unit}"
    return f"{size} bytes"


class Reader:
    """python-multipart's callbacks, collecting parts into a Form with caps on each."""

    def __init__(self, max_file_bytes: int) -> None:
        self.max_file_bytes = max_file_bytes
        self.form = Form()
        self.parts = 0
        self.header_name, self.header_value, self.disposition = b"", b"", b""
        self.name: str | None = None
        self.is_file, self.ended = False, False
        self.data = bytearray()

    def on_part_begin(self) -> None:
        self.parts += 1
        if self.parts > MAX_PARTS:
            raise bad_request(f"the form has over {MAX_PARTS} parts: send the image and the fields once each",
                              code="invalid_body")
        self.disposition, self.name, self.is_file, self.data = b"", None, False, bytearray()

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self.header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self.header_value += data[start:end]

    def on_header_end(self) -> None:
        if self.header_name.strip().lower() == b"content-disposition":
            self.disposition = self.header_value
        self.header_name, self.header_value = b"", b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self.disposition)
        if b"name" not in options:
            raise bad_request("a form part has no name (Content-Disposition: form-data; name=...)",
                              code="invalid_body")
        self.name = decoded(options[b"name"], "a field name", None)
        self.is_file = b"filename" in options

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        cap = self.max_file_bytes if self.is_file else MAX_FIELD_BYTES
        if len(self.data) + end - start > cap:
            if self.is_file:
                raise ApiError(413, f"{self.name} is over {size_text(cap)}: send a smaller file (this server's "
                               "upload limit)", code="file_too_large", param=self.name)
            raise bad_request(f"{self.name} is over {cap} bytes: send a shorter value", self.name,
                              "string_above_max_length")
        self.data += data[start:end]

    def on_part_end(self) -> None:
        if self.is_file:
            self.form.files.append((self.name, self.data))  # no copy: up to the upload cap
        else:
            self.form.fields.append((self.name, decoded(bytes(self.data), self.name, self.name)))
        self.data = bytearray()

    def on_end(self) -> None:
        self.ended = True

    def callbacks(self) -> dict:
        return {name: getattr(self, name) for name in ("on_part_begin", "on_header_field", "on_header_value",
                                                       "on_header_end", "on_headers_finished", "on_part_data",
                                                       "on_part_end", "on_end")}


async def read_form(content_type: str | None, stream: AsyncIterator[bytes], max_file_bytes: int) -> Form:
    """The form of a multipart/form-data body read from `stream`, each file at most max_file_bytes (else 413), each
    text field at most MAX_FIELD_BYTES and valid UTF-8 (else 400); an urlencoded body gives fields only."""
    kind, params = parse_options_header(content_type or "")
    if kind == b"application/x-www-form-urlencoded":
        return await read_urlencoded(stream)
    if kind != b"multipart/form-data" or not params.get(b"boundary"):
        raise bad_request("the body is not multipart/form-data: send the fields as a form with the image as a file "
                          "(curl -F image=@in.png -F prompt=...)", code="invalid_body")
    reader = Reader(max_file_bytes)
    parser = MultipartParser(params[b"boundary"], reader.callbacks())
    try:
        async for chunk in stream:
            parser.write(chunk)
        parser.finalize()
    except FormParserError:
        raise bad_request("the body is not readable multipart/form-data: send the fields as a form with the image "
                          "as a file", code="invalid_body") from None
    if not reader.ended:
        raise bad_request("the multipart body is empty or ends early: send the whole form", code="invalid_body")
    return reader.form


async def read_urlencoded(stream: AsyncIterator[bytes]) -> Form:
    """An application/x-www-form-urlencoded body (fields, no files) of at most MAX_PARTS * MAX_FIELD_BYTES."""
    body = bytearray()
    async for chunk in stream:
        body += chunk
        if len(body) > MAX_PARTS * MAX_FIELD_BYTES:
            raise ApiError(413, f"the form is over {size_text(MAX_PARTS * MAX_FIELD_BYTES)}: send shorter fields",
                           code="request_too_large")
    try:
        pairs = parse_qsl(body.decode("ascii"), keep_blank_values=True, encoding="utf-8", errors="strict",
                          max_num_fields=MAX_PARTS)
    except UnicodeDecodeError:
        raise bad_request("a form field is not valid UTF-8 text: send form fields in UTF-8", code="invalid_value") \
            from None
    except ValueError:
        raise bad_request(f"the form has over {MAX_PARTS} fields: send each field once", code="invalid_body") \
            from None
    for name, value in pairs:
        if len(value.encode("utf-8", "surrogatepass")) > MAX_FIELD_BYTES:
            raise bad_request(f"{name} is over {MAX_FIELD_BYTES} bytes: send a shorter value", name,
                              "string_above_max_length")
    return Form(pairs)


def read_json_edit(body: bytes, max_file_bytes: int) -> Form:
    """A JSON edit, {"prompt": ..., "images": [{"image_url": "data:image/png;base64,..."}, ...]} as OpenAI's JSON
    edits send it (or "image": one such item; an item may also be the data URL or bare base64 text): its images as
    `image[]` files in order, each at most max_file_bytes (else 413), its other members as fields. URLs other than
    data URLs are refused: this server fetches nothing."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        raise bad_request("the body is not JSON: send {\"prompt\": \"...\", \"images\": [{\"image_url\": "
                          "\"data:image/png;base64,...\"}]}", code="invalid_body") from None
    if not isinstance(data, dict):
        raise bad_request("the body must be a JSON object like {\"prompt\": \"...\", \"images\": [...]}",
                          code="invalid_body")
    items = [data.pop("image")] if "image" in data else []
    if "images" in data:
        if not isinstance(data["images"], list):
            raise bad_request("images must be a list of {\"image_url\": \"data:image/png;base64,...\"}", "images",
                              "invalid_type")
        items += data.pop("images")
    return Form(list(data.items()), [("image[]", image_bytes(item, max_file_bytes)) for item in items])


def image_bytes(item: Any, max_file_bytes: int) -> bytes:
    """One JSON image, {"image_url": URL} or the URL itself: a data URL or bare base64, decoded (at most
    max_file_bytes, else 413)."""
    url = item.get("image_url") if isinstance(item, dict) else item
    if isinstance(url, dict):  # {"image_url": {"url": ...}}, as chat messages nest it
        url = url.get("url")
    if not isinstance(url, str):
        raise bad_request("an image must be {\"image_url\": \"data:image/png;base64,...\"} or that data URL",
                          "images", "invalid_type")
    if url.startswith(("http://", "https://", "file:")):
        raise bad_request("images: this server fetches no URLs: send each image inline as a data URL "
                          "(data:image/png;base64,...)", "images", "unsupported_value")
    payload = url.split(",", 1)[1] if url.startswith("data:") and "," in url else url
    if len(payload) // 4 * 3 > max_file_bytes:
        raise ApiError(413, f"an image is over {size_text(max_file_bytes)}: send a smaller file (this server's upload "
                       "limit)", code="file_too_large", param="images")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request("an image is not valid base64: send data:image/png;base64,... with the file's bytes",
                          "images", "invalid_value") from None
