from itemadapter import ItemAdapter
from scrapy.exceptions import DropItem

PIPELINE_VERSION = 1


class DropCategoryPipeline:
    """Drops every item of the SHOPBOT_DROP_CATEGORY category."""

    def __init__(self, category):
        self.category = category

    @classmethod
    def from_crawler(cls, crawler):
        return cls(crawler.settings.get("SHOPBOT_DROP_CATEGORY"))

    def process_item(self, item, spider=None):
        if ItemAdapter(item).get("category") == self.category:
            raise DropItem(f"category {self.category}")
        return item


class PriceBandPipeline:
    """Derives `price_band` from the price; `tag` from the SHOPBOT_TAG setting."""

    def __init__(self, tag):
        self.tag = tag

    @classmethod
    def from_crawler(cls, crawler):
        return cls(crawler.settings.get("SHOPBOT_TAG"))

    def process_item(self, item, spider=None):
        adapter = ItemAdapter(item)
        adapter["price_band"] = f"v{PIPELINE_VERSION}:" + (
            "low" if adapter["price"] < 50 else "high"
        )
        adapter["tag"] = self.tag
        return item
