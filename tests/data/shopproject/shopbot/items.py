import scrapy


class Product(scrapy.Item):
    sku = scrapy.Field()
    name = scrapy.Field()
    price = scrapy.Field()
    currency = scrapy.Field()
    category = scrapy.Field()
    price_band = scrapy.Field()  # added by PriceBandPipeline
    tag = scrapy.Field()  # added by PriceBandPipeline from the SHOPBOT_TAG setting
