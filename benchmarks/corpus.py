"""A seeded, mixed corpus of realistic Segment events for the benchmark.

Every preset of the bundled rules appears (Product Viewed, Product Clicked, Banner Impression,
Banner Click, Product List Viewed with 0–48 products, Order Completed with 1–20 items, page and
screen calls), beside events no rule wants (identify, other track events). Impressions and clicks
are sponsored (a bid), organic (a product id or an entity, no bid) or, now and then, neither; some
are offsite (from an ad elsewhere, with the DSP's click ids); lists mix items with and without a
bid. Values are as messy as
real sources send them: numeric strings for prices and quantities, ids as numbers, timestamps with
``Z``, an offset, no zone or as epoch milliseconds, mixed-case device types, server events with a
``userId`` only, and now and then a value Topsort refuses. Each event carries a full Segment
envelope (context with page, device, userAgent and library; integrations; sentAt, receivedAt…).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import orjson

Event = dict[str, Any]

NOT_WANTED = "no rule (identify, other)"
PAGE_OR_SCREEN = "page / screen"
PRESETS = (
    "Product Viewed", "Product List Viewed", "Product Clicked", "Banner Impression", "Banner Click",
    "Order Completed", PAGE_OR_SCREEN, NOT_WANTED,
)
"""The preset groups the benchmark reports separately, in report order."""

_WEIGHTS = {
    "Product Viewed": 26, "Product List Viewed": 8, "Product Clicked": 9, "Banner Impression": 5,
    "Banner Click": 2, "Order Completed": 4, "page": 18, "screen": 6, "identify": 8, "other track": 14,
}
_CLICK_IDS = ("gclid", "fbclid", "ttclid", "msclkid")
_OTHER_TRACKS = ("Products Searched", "Cart Viewed", "Checkout Started", "Product Added", "Signed In",
                 "Coupon Applied", "Promotion Viewed")
_WRITE_KEYS = {"web": "wkWeb7Qm2Xr9LpT4vKc8NzA1sD5fG3hJ", "app": "wkApp3Vb8Nq1ZxC6mLk2PwR9tY4uE7iO",
               "server": "wkSrv5Hn2Jd8Fs3Gk9Lq4Wz7Xc1Vb6Nm"}
_START = datetime(2026, 11, 27, 8, 0, tzinfo=timezone.utc)
_CATEGORIES = ("shoes", "outdoor", "kitchen", "toys", "garden", "electronics", "beauty", "books")
_BRANDS = ("acme", "globex", "initech", "umbrella", "hooli", "stark", "wayne", "tyrell")
_WORDS = ("red", "trail", "running", "classic", "ultra", "compact", "wireless", "organic", "deluxe", "mini")
_PAGE_TYPES = ("home", "category", "PDP", "search", "cart", "other")
_WEB_DEVICES = ("desktop", "mobile", "Desktop", "macOS", "macos", "Windows", "windows", "tablet")
_APP_DEVICES = ("ios", "android", "iOS", "Android", "IOS")
_USER_AGENTS = (
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/131.0.0.0 Safari/537.36",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/131.0.0.0 Safari/537.36 Edg/131.0.0.0",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
    "Version/18.1 Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/131.0.6778.81 Mobile Safari/537.36",
)


def preset(event: Any) -> str:
    """The preset group of an event (one of :data:`PRESETS`)."""
    if not isinstance(event, dict):
        return NOT_WANTED
    kind = event.get("type")
    if kind in ("page", "screen"):
        return PAGE_OR_SCREEN
    name = event.get("event")
    if kind == "track" and name in PRESETS:
        return name
    return NOT_WANTED


def generate(count: int, seed: int = 0) -> Iterator[Event]:
    """``count`` Segment events, the same ones for the same seed."""
    rng = random.Random(seed)
    builders: dict[str, Callable[[_Maker], Event]] = {
        "Product Viewed": lambda m: m.interaction("Product Viewed"),
        "Product Clicked": lambda m: m.interaction("Product Clicked"),
        "Banner Impression": lambda m: m.banner("Banner Impression"),
        "Banner Click": lambda m: m.banner("Banner Click"),
        "Product List Viewed": _Maker.product_list,
        "Order Completed": _Maker.order,
        "page": _Maker.page,
        "screen": _Maker.screen,
        "identify": _Maker.identify,
        "other track": _Maker.other_track,
    }
    names = list(_WEIGHTS)
    weights = list(_WEIGHTS.values())
    for number in range(count):
        maker = _Maker(rng, number)
        yield builders[rng.choices(names, weights)[0]](maker)


def lines(count: int, seed: int = 0) -> Iterator[bytes]:
    """The corpus as NDJSON lines (without the newline)."""
    return (orjson.dumps(event) for event in generate(count, seed))


def write_ndjson(path: str | Path, count: int, seed: int = 0, chunk: int = 2048) -> int:
    """Stream the corpus to ``path`` as NDJSON; return the number of bytes written."""
    written = 0
    buffer: list[bytes] = []
    with open(path, "wb") as out:
        for line in lines(count, seed):
            buffer.append(line)
            if len(buffer) >= chunk:
                written += out.write(b"\n".join(buffer) + b"\n")
                buffer.clear()
        if buffer:
            written += out.write(b"\n".join(buffer) + b"\n")
    return written


class _Maker:
    """Builds one event; ``rng`` is shared so the whole corpus follows from the seed."""

    def __init__(self, rng: random.Random, number: int) -> None:
        self.rng = rng
        self.moment = _START + timedelta(milliseconds=number * 37 + rng.randrange(1000))
        self.platform = rng.choices(("web", "app", "server"), (70, 22, 8))[0]

    # -- presets -------------------------------------------------------------------------------

    def interaction(self, name: str) -> Event:
        rng = self.rng
        product = self.product(self.between(1, 30))
        properties: dict[str, Any] = {**product, "currency": "USD"}
        if rng.random() < 0.5:
            properties["placement"] = self.placement()
        if rng.random() < 0.6:
            properties["page"] = {"type": self.pick(_PAGE_TYPES), "pageId": self.hex(8)}
        if rng.random() < 0.3:
            properties["entity"] = {"id": product["product_id"], "type": "product"}
        if rng.random() < 0.15:
            self.offsite(properties)
        elif rng.random() < 0.03:
            del properties["product_id"]  # neither a bid nor a product, unless an entity: rejected
        if rng.random() < 0.1:
            properties["externalCampaignId"] = f"camp-{self.between(1, 99)}"
        event = self.track(name, properties)
        if rng.random() < 0.3:
            event["position"] = self.between(1, 24)
        return event

    def banner(self, name: str) -> Event:
        rng = self.rng
        properties: dict[str, Any] = {
            "object": {"type": "banner", "assetId": f"hero-{self.between(1, 40)}"},
            "creative": f"cr-{self.hex(6)}", "promotion_id": f"promo-{self.between(1, 300)}",
            "name": "Holiday sale", "position": self.pick((1, 2, 3, "1")),
        }
        if rng.random() < 0.7:
            properties["resolvedBidId"] = self.bid()
        elif rng.random() < 0.8:
            properties["entity"] = {"type": "vendor", "id": f"vendor-{self.between(1, 50)}"}  # organic
        if rng.random() < 0.3:
            properties["externalVendorId"] = self.pick((f"vendor-{self.between(1, 50)}", self.between(1, 50)))
        return self.track(name, properties)

    def product_list(self) -> Event:
        count = self.pick((0, self.between(1, 12), self.between(1, 24), self.between(12, 48)))
        products = [self.product(position, lean=True) for position in range(1, count + 1)]
        properties = {"list_id": f"{self.pick(_CATEGORIES)}-results", "category": self.pick(_CATEGORIES),
                      "products": products}
        return self.track("Product List Viewed", properties)

    def order(self) -> Event:
        items = [self.order_item() for _ in range(self.between(1, 20))]
        total = round(sum(_as_float(item.get("price")) * _as_float(item.get("quantity", 1)) for item in items), 2)
        properties = {
            "checkout_id": self.hex(16), "order_id": f"o-{self.between(10**6, 10**7)}", "affiliation": "web store",
            "total": total, "subtotal": total, "revenue": total, "shipping": 4.99, "tax": round(total * 0.08, 2),
            "discount": 0, "coupon": self.pick(("", "WINTER", None)), "currency": "USD", "products": items,
        }
        return self.track("Order Completed", properties)

    def page(self) -> Event:
        event = self.envelope("page")
        context_page = event["context"].get("page") or self.context_page()
        event["name"] = context_page["title"]
        event["properties"] = {**context_page}
        if self.rng.random() < 0.97:
            event["properties"]["page"] = self.page_ref()
        return event

    def screen(self) -> Event:
        event = self.envelope("screen")
        name = self.pick(("Home", "Search", "Product", "Cart"))
        event["name"] = name
        event["properties"] = {"name": name}
        if self.rng.random() < 0.97:
            event["properties"]["page"] = self.page_ref()
        return event

    def identify(self) -> Event:
        event = self.envelope("identify")
        event["userId"] = event.get("userId") or f"user-{self.between(1, 10**6)}"
        event["traits"] = {
            "email": f"{self.hex(6)}@example.com", "name": "Ada Lovelace", "plan": self.pick(("free", "pro")),
            "createdAt": self.iso(self.moment - timedelta(days=self.between(1, 900))),
            "address": {"city": "Berlin", "country": "DE", "postalCode": "10115"}, "logins": self.between(1, 99),
        }
        return event

    def other_track(self) -> Event:
        rng = self.rng
        name = self.pick(_OTHER_TRACKS)
        properties: dict[str, Any] = {"query": " ".join(rng.sample(_WORDS, 2))} if name == "Products Searched" else {}
        if name == "Product Added":
            properties = {**self.product(1), "quantity": 1, "cart_id": self.hex(12)}
        return self.track(name, properties)

    # -- parts ---------------------------------------------------------------------------------

    def offsite(self, properties: dict[str, Any]) -> None:
        """An interaction with an ad on another site: channel offsite and the DSP's click ids."""
        properties["channel"] = "offsite"
        properties["dspMetadata"] = {self.pick(_CLICK_IDS): self.hex(24), "campaign": self.between(1, 500)}

    def track(self, name: str, properties: dict[str, Any]) -> Event:
        event = self.envelope("track")
        event["event"] = name
        if self.rng.random() < 0.7:
            properties.setdefault("channel", "onsite")
        event["properties"] = properties
        self.spoil(event)
        return event

    def envelope(self, kind: str) -> Event:
        rng = self.rng
        sent = self.moment + timedelta(milliseconds=self.between(5, 900))
        event: Event = {
            "anonymousId": self.uuid(),
            "channel": {"web": "client", "app": "mobile", "server": "server"}[self.platform],
            "context": self.context(),
            "integrations": {"All": True, "Topsort (Actions)": True, "Mixpanel": False,
                             "Amplitude": {"session_id": self.moment_ms()}},
            "messageId": self.message_id(),
            "originalTimestamp": self.iso(self.moment),
            "receivedAt": self.iso(sent + timedelta(milliseconds=self.between(20, 400))),
            "sentAt": self.iso(sent),
            "timestamp": self.timestamp(),
            "type": kind,
            "version": 2,
            "writeKey": _WRITE_KEYS[self.platform],
            "_metadata": {"bundled": ["Segment.io", "Topsort (Actions)", "Amplitude"], "unbundled": [],
                          "bundledIds": ["64a1f0c2e9b3d7a5c8e1f203", "64a1f0c2e9b3d7a5c8e1f2a7"]},
        }
        if rng.random() < 0.45 or self.platform == "server":
            event["userId"] = self.pick((f"user-{self.between(1, 10**6)}", self.between(1, 10**6)))
        if self.platform == "server" and rng.random() < 0.7:
            del event["anonymousId"]
        return event

    def context(self) -> dict[str, Any]:
        rng = self.rng
        context: dict[str, Any] = {"ip": f"203.0.{self.between(0, 255)}.{self.between(1, 254)}", "locale": "en-US",
                                   "timezone": self.pick(("Europe/Berlin", "America/New_York", "Asia/Tokyo")),
                                   "instanceId": self.uuid(), "sessionId": self.moment_ms()}
        if self.platform == "web":
            agent = self.pick(_USER_AGENTS)
            context["library"] = {"name": "analytics.js", "version": "npm:next-1.72.0"}
            context["page"] = self.context_page()
            context["userAgent"] = agent
            context["userAgentData"] = {"brands": [{"brand": "Chromium", "version": "131"},
                                                   {"brand": "Not_A Brand", "version": "24"}],
                                        "mobile": "Mobile" in agent, "platform": "macOS"}
            context["screen"] = {"width": 1512, "height": 982, "density": 2}
            if rng.random() < 0.75:
                context["device"] = {"type": self.pick(_WEB_DEVICES)}
            if rng.random() < 0.5:
                context["campaign"] = {"name": "winter-sale", "source": "google", "medium": "cpc", "term": "shoes",
                                       "content": "text-ad-3"}
        elif self.platform == "app":
            device = self.pick(_APP_DEVICES)
            context["app"] = {"name": "Shop", "version": "5.12.0", "build": "5120", "namespace": "com.shop.app"}
            context["device"] = {"id": self.uuid(), "manufacturer": "Apple" if device.lower() == "ios" else "Google",
                                 "model": "iPhone15,2", "name": "iPhone", "type": device,
                                 "advertisingId": self.uuid(), "adTrackingEnabled": rng.random() < 0.5}
            context["library"] = {"name": f"analytics-{device.lower()}", "version": "4.1.8"}
            context["network"] = {"wifi": True, "carrier": "T-Mobile", "cellular": False}
            context["os"] = {"name": device, "version": "18.1"}
            context["screen"] = {"width": 393, "height": 852, "density": 3}
            context["traits"] = {"anonymousId": self.uuid()}
        else:
            context["library"] = {"name": "analytics-node", "version": "2.1.2"}
        return context

    def context_page(self) -> dict[str, Any]:
        category = self.pick(_CATEGORIES)
        path = self.pick((f"/c/{category}", f"/p/{self.hex(6)}", "/search", "/", "/cart"))
        search = f"?q={self.pick(_WORDS)}" if path == "/search" else ""
        return {"path": path, "referrer": "https://www.google.com/", "search": search,
                "title": f"{category.title()} | Shop", "url": f"https://shop.example{path}{search}"}

    def page_ref(self) -> dict[str, Any]:
        return {"type": self.pick(_PAGE_TYPES), "pageId": self.pick((self.hex(8), self.between(1, 999)))}

    def placement(self) -> dict[str, Any]:
        rng = self.rng
        placement: dict[str, Any] = {"page": self.pick((1, 2, 3, "2")), "pageSize": self.pick((24, 48, "48"))}
        if self.platform != "web":
            placement["path"] = self.pick(("/app/search", "/app/home", "/app/category"))
        if rng.random() < 0.4:
            placement["searchQuery"] = " ".join(rng.sample(_WORDS, 2))
        if rng.random() < 0.3:
            placement["categoryIds"] = [self.pick(_CATEGORIES), self.between(1, 99)]
        if rng.random() < 0.2:
            placement["name"] = "search-grid"  # not a Topsort field: dropped
        return placement

    def product(self, position: int, lean: bool = False) -> dict[str, Any]:
        rng = self.rng
        product_id = self.pick((f"p-{self.between(1, 99999)}", self.between(1, 99999), f"SKU-{self.hex(6)}"))
        product: dict[str, Any] = {
            "product_id": product_id, "sku": f"SKU-{self.hex(6)}",
            "name": f"{self.pick(_WORDS).title()} {self.pick(_WORDS)} {self.pick(_CATEGORIES)}",
            "price": self.price(), "position": position, "category": self.pick(_CATEGORIES),
        }
        if not lean:
            product.update(brand=self.pick(_BRANDS), variant=self.pick(_WORDS), quantity=1,
                           url=f"https://shop.example/p/{product_id}",
                           image_url=f"https://cdn.shop.example/img/{self.hex(10)}.jpg")
        if rng.random() < 0.35:
            product["resolvedBidId"] = self.bid()
            if rng.random() < 0.2:
                product["additionalAttribution"] = {"id": f"v-{self.between(1, 99)}", "type": "vendor"}
        elif lean and rng.random() < 0.05:
            product["entity"] = {"type": "vendor", "id": f"vendor-{self.between(1, 50)}"}
        elif lean and rng.random() < 0.01:
            del product["product_id"]  # an item with neither: rejected alone
        return product

    def order_item(self) -> dict[str, Any]:
        rng = self.rng
        item = {"product_id": self.pick((f"p-{self.between(1, 99999)}", self.between(1, 99999))),
                "sku": f"SKU-{self.hex(6)}", "name": f"{self.pick(_WORDS).title()} {self.pick(_CATEGORIES)}",
                "price": self.price(), "quantity": self.pick((1, 1, 2, 3, "1", "2")),
                "category": self.pick(_CATEGORIES), "brand": self.pick(_BRANDS)}
        if rng.random() < 0.3:
            item["vendorId"] = f"vendor-{self.between(1, 50)}"
        return item

    def spoil(self, event: Event) -> None:
        """Now and then, one value Topsort refuses (the rest of the corpus stays valid)."""
        rng = self.rng
        if rng.random() >= 0.03:
            return
        properties = event["properties"]
        choice = rng.randrange(6)
        if choice == 0:
            event["timestamp"] = self.pick(("yesterday", "27/11/2026 10:00"))
        elif choice == 1:
            event.pop("anonymousId", None)
            event.pop("userId", None)
        elif choice == 2:
            properties["channel"] = "web"
        elif choice == 3 and isinstance(properties.get("products"), list) and properties["products"]:
            victim = self.pick(properties["products"])
            victim["price"] = self.pick((0, "free", -1))
            victim.pop("product_id", None)
        elif choice == 4:
            properties["object"] = {"type": "video"}
        else:
            properties["additionalAttribution"] = {"id": "v-1", "type": "vendor"}
            properties.pop("resolvedBidId", None)

    # -- values --------------------------------------------------------------------------------

    def timestamp(self) -> Any:
        rng = self.rng
        form = rng.choices(("z", "offset", "naive", "epoch"), (60, 15, 12, 13))[0]
        if form == "epoch":
            return self.moment_ms()
        if form == "offset":
            local = self.moment.astimezone(timezone(timedelta(hours=self.pick((-5, 1, 9)))))
            return local.isoformat(timespec="milliseconds")
        text = self.iso(self.moment)
        return text[:-1] if form == "naive" else text

    def price(self) -> Any:
        value = round(self.rng.uniform(1, 300), 2)
        return str(value) if self.rng.random() < 0.3 else value

    def pick(self, choices: tuple[Any, ...]) -> Any:
        return choices[int(self.rng.random() * len(choices))]

    def between(self, low: int, high: int) -> int:
        return low + int(self.rng.random() * (high - low + 1))

    def moment_ms(self) -> int:
        return int(self.moment.timestamp() * 1000)

    def bid(self) -> str:
        return "ChkI" + self.hex(self.pick((20, 40, 60)))

    def message_id(self) -> str:
        return ("ajs-next-" + self.hex(32)) if self.platform == "web" else self.uuid()

    def uuid(self) -> str:
        h = self.hex(32)
        return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"

    def hex(self, digits: int) -> str:
        return f"{self.rng.getrandbits(digits * 4):0{digits}x}"

    @staticmethod
    def iso(moment: datetime) -> str:
        return moment.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _as_float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return 0.0
