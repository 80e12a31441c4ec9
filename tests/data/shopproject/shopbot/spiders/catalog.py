from scrapy.linkextractors import LinkExtractor
from scrapy.spiders import CrawlSpider, Rule

from shopbot.loaders import ProductLoader


class CatalogSpider(CrawlSpider):
    """Category pages are followed, product pages parsed: `-a base_url=http://...`."""

    name = "catalog"
    custom_settings = {"SHOPBOT_TAG": "from-custom-settings", "DEPTH_LIMIT": 4}
    rules = (
        Rule(LinkExtractor(allow=r"/category/"), follow=True),
        Rule(LinkExtractor(allow=r"/product/"), callback="parse_product"),
    )

    def __init__(self, base_url="http://127.0.0.1:8801", *args, **kwargs):
        self.start_urls = [f"{base_url.rstrip('/')}/index.html"]
        super().__init__(*args, **kwargs)

    def parse_product(self, response):
        loader = ProductLoader(selector=response.css(".product-detail"))
        loader.add_css("sku", ".sku::text")
        loader.add_css("name", "h1::text")
        loader.add_css("price", ".price::text")
        loader.add_css("currency", ".price::attr(data-currency)")
        loader.add_css("category", "a.category::text")
        return loader.load_item()
