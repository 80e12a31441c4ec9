from itemloaders.processors import Join, MapCompose, TakeFirst
from scrapy.loader import ItemLoader

from shopbot.items import Product


def _price(text: str) -> float:
    return float(text.replace(",", ""))


class ProductLoader(ItemLoader):
    default_item_class = Product
    default_input_processor = MapCompose(str.strip)
    default_output_processor = TakeFirst()
    name_in = MapCompose(str.strip, lambda s: " ".join(s.split()))
    name_out = Join(" ")
    price_in = MapCompose(str.strip, _price)
    category_in = MapCompose(str.strip, str.lower)
