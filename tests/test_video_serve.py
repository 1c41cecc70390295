"""`/v1/assess` with a video (a data URL or an upload) and with a list of images (one post):
one Decision naming the deciding frame or image; every answer checked by the OpenAPI contract
(tests/test_serve.py's `Api`)."""

from __future__ import annotations

import base64
import io

from policy_engine.serve.pool import EnginePool
from tests.colour_backend import ColourBackend, red_image
from tests.test_serve import serving
from tests.video_files import grey_video


def data_url(data: bytes, media: str) -> str:
    return f"data:{media};base64,{base64.b64encode(data).decode('ascii')}"


def png(value: float) -> bytes:
    buffer = io.BytesIO()
    red_image(value).save(buffer, format="PNG")
    return buffer.getvalue()


CLIP = grey_video(seconds=3, fps=10, red={20})


def test_a_video_data_url_is_one_decision_naming_the_frame() -> None:
    with serving(EnginePool(["llavaguard"], ColourBackend())) as api:
        response = api.post("/v1/assess", json={"image": data_url(CLIP, "video/mp4")})
    assert response.status_code == 200, response.text
    decision = response.json()["decision"]
    assert decision["rating"] == "Unsafe"
    assert decision["verdict"]["deciding_part"] == 2
    assert decision["verdict"]["parts"][2]["timestamp"] == 2.0


def test_a_video_upload_and_several_image_parts() -> None:
    with serving(EnginePool(["llavaguard"], ColourBackend())) as api:
        video = api.post("/v1/assess", files={"image": ("clip.mp4", CLIP, "video/mp4")})
        post = api.post(
            "/v1/assess",
            files=[
                ("image", ("a.png", png(0.0), "image/png")),
                ("image", ("b.png", png(1.0), "image/png")),
            ],
        )
    assert video.status_code == 200, video.text
    assert video.json()["decision"]["verdict"]["deciding_part"] == 2
    assert post.status_code == 200, post.text
    verdict = post.json()["decision"]["verdict"]
    assert (verdict["rating"], verdict["deciding_part"], len(verdict["parts"])) == ("Unsafe", 1, 2)


def test_a_list_of_images_is_one_post() -> None:
    images = [data_url(png(0.0), "image/png"), data_url(png(1.0), "image/png")]
    with serving(EnginePool(["llavaguard"], ColourBackend())) as api:
        single = api.post("/v1/assess", json={"image": images})
        batch = api.post(
            "/v1/assess/batch", json={"items": [{"image": images}, {"image": images[0]}]}
        )
        too_many = api.post("/v1/assess", json={"image": images * 9})
    assert single.status_code == 200, single.text
    assert single.json()["decision"]["verdict"]["deciding_part"] == 1
    decisions = batch.json()["decisions"]
    assert [d["rating"] for d in decisions] == ["Unsafe", "Safe"]
    assert decisions[1]["verdict"].get("parts") is None
    assert too_many.status_code == 422


def test_text_sent_as_a_video_is_a_422_saying_why() -> None:
    fake = data_url(b"hello, I am not a video" * 10, "video/mp4")
    with serving(EnginePool(["llavaguard"], ColourBackend())) as api:
        response = api.post("/v1/assess", json={"image": fake})
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "invalid_image" and "not a video" in error["message"]
